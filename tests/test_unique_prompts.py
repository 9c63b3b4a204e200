"""No prompt is sent twice unless the workload says so, and prompts are text or token ids of exact length:
checked against the sim engine as a real server, whose /metrics counts prompt tokens and prefix-cache hits."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from servetune.loadgen import datasets
from servetune.loadgen.datasets import prose_text, random_dataset
from servetune.loadgen.records import Request
from servetune.loadgen.runner import REPEAT_TOKEN_LOW, repeat_variant
from servetune.loadgen.tokenizer import PromptTokenizer, find_tokenizer
from servetune.optimizer.cli.bench import main as bench
from servetune.optimizer.driver import dataset_args, scenario_plans
from servetune.optimizer.engines.prometheus import parse_prometheus
from servetune.optimizer.lifecycle import _dataset
from servetune.optimizer.spec import parse_study
from test_sim_server import Server
from tokenizer_fixture import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tok(model_dir):
    return PromptTokenizer(model_dir)


@pytest.fixture(scope="module")
def sim(model_dir, tmp_path_factory):
    # a 256-token step budget admits four 64-token prompts a step, so a replayed prompt queued behind its first
    # copy finds that copy's blocks computed however fast the requests arrive (with the default 8192, all 60 can
    # land in one step and none hits: what made this test flaky on a slow machine)
    server = Server(tmp_path_factory.mktemp("sim"), "--model", str(model_dir), "--gpu", "h100",
                    "--max-num-batched-tokens", "256", delay=0.1)
    server.wait_healthy()
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)


def _counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        m = parse_prometheus(r.read().decode())
    return {"prompt": m["vllm:prompt_tokens_total"], "hits": m["vllm:prefix_cache_hits_total"]}


def _bench(sim, model_dir, out, *args: str) -> tuple[dict, dict[str, float]]:
    before = _counters(sim.url)
    rc = bench(["--url", sim.url, "--model", str(model_dir), "--scenario", "offline", "--input-tokens", "64",
                "--output-tokens", "4", "--quiet", "-o", str(out), *args])
    assert rc == 0
    after = _counters(sim.url)
    return json.loads((out / "result.json").read_text()), {k: after[k] - before[k] for k in after}


def test_repeat_variant_markers():
    ids = Request(prompt=[5000, 5001], max_tokens=2, input_tokens=2)
    assert repeat_variant(ids, 0) is ids
    assert repeat_variant(ids, 1).prompt == [REPEAT_TOKEN_LOW + 1, 5000, 5001]
    many = {tuple(repeat_variant(ids, k).prompt) for k in range(3000)}  # two-token markers past the base
    assert len(many) == 3000 and all(t < 1000 for p in many for t in p[:-2])
    text = repeat_variant(Request(prompt="the cat", max_tokens=2, input_tokens=2), 2)
    assert text.prompt == "R2 the cat" and text.input_tokens == 3


def test_tokenizer_prompts_exact_unique_and_the_same_tokens_as_text_or_ids(tok, model_dir):
    assert find_tokenizer(model_dir) == model_dir / "tokenizer.json" and find_tokenizer(model_dir / "nope") is None
    assert tok.specials == 1 and tok.pool.size > 100  # BOS; the vocabulary's word tokens
    text = random_dataset(30, 48, 4, prompt_format="text", tokenizer=tok, seed=5)
    ids = random_dataset(30, 48, 4, prompt_format="token_ids", tokenizer=tok, seed=5)
    for t, i in zip(text, ids):
        assert isinstance(t.prompt, str) and t.input_tokens == i.input_tokens == 48
        assert tok.with_specials(tok.encode(t.prompt)) == i.prompt  # what the server makes of the text
    assert len({r.prompt for r in text}) == 30
    shared = random_dataset(20, 48, 4, prompt_format="token_ids", tokenizer=tok, shared_prefix_tokens=16, seed=1)
    assert len({tuple(r.prompt[:17]) for r in shared}) == 1 and len({tuple(r.prompt[17:21]) for r in shared}) == 20
    with pytest.raises(ValueError, match="shared_prefix_tokens"):
        random_dataset(2, 16, 4, shared_prefix_tokens=16)
    with pytest.raises(ValueError, match="tokenizer.json"):
        PromptTokenizer(model_dir / "nope")


def test_bench_sends_no_prompt_twice_unless_told_to_replay(sim, model_dir, tmp_path):
    # 60 requests from 20 samples: the old behaviour resent 40 of them (prefix-cache hits on 48 of 64 tokens)
    doc, d = _bench(sim, model_dir, tmp_path / "unique", "--num-requests", "60", "--dataset-size", "20",
                    "--prompt-format", "token_ids", "--seed", "1")
    assert d["hits"] == 0 and d["prompt"] == 20 * 64 + 40 * 65  # a reissue carries a one-token marker
    assert doc["dataset"]["replay"] is False and doc["dataset"]["prompt_format"] == "token_ids"
    doc, d = _bench(sim, model_dir, tmp_path / "replay", "--num-requests", "60", "--dataset-size", "20",
                    "--prompt-format", "token_ids", "--seed", "2", "--replay")
    # a resent prompt hits the full blocks its first copy computed (3 of its 4: one token is always computed)
    assert 0 < d["hits"] <= 40 * 48 and doc["results"][0]["settings"]["replay"] is True


def test_bench_text_prompts_are_exact_and_the_same_tokens_as_ids(sim, model_dir, tmp_path):
    doc, d = _bench(sim, model_dir, tmp_path / "text", "--num-requests", "20", "--seed", "3")  # auto: text
    assert doc["dataset"]["prompt_format"] == "text" == doc["results"][0]["settings"]["prompt_format"]
    assert doc["dataset"]["tokenizer"] == str(model_dir / "tokenizer.json")
    assert d["prompt"] == 20 * 64 and d["hits"] == 0  # the server's own count: exactly what was asked
    # the same seed as token ids, replayed on purpose (else the audit would fail the run and bench would run it
    # again with fresh prompts): the same tokens as the text run, so the cache serves every full block
    doc, d = _bench(sim, model_dir, tmp_path / "ids", "--num-requests", "20", "--seed", "3",
                    "--prompt-format", "token_ids", "--allow-prefix-hits")
    assert d["prompt"] == 20 * 64 and d["hits"] == 20 * 48


def test_tokenizer_rounds_fix_a_text_that_does_not_encode_back(tok):
    rng = np.random.default_rng(0)
    bad = [[int(i) for i in rng.integers(0, 1999, size=40)] for _ in range(64)]  # any ids: byte pieces, merges
    texts, final = tok.prompts(bad, rng)
    assert [len(tok.encode(t)) for t in texts] == [len(f) for f in final]
    untouched = sum(len(tok.encode(tok._tok.decode(b))) == 40 for b in bad)
    exact = sum(len(f) == 40 for f in final)
    assert exact >= 48 and exact > untouched + 8, (exact, untouched)  # most end exact, far more than without rounds


def test_a_study_sends_text_when_its_model_has_a_tokenizer(model_dir):
    text = (f"name: t\nmodel: {{path: {model_dir}}}\nengines: [sim]\nworkload:\n"
            "  dataset: {input_tokens: 64, output_tokens: 4, num_requests: 5, shared_prefix_tokens: 16}\n"
            "  scenarios: [{kind: offline}]\nobjectives: [{metric: output_tokens_per_s}]\n")
    spec = parse_study(text, str(model_dir / "s.yaml"))
    d = dataset_args(spec)
    assert d["prompt_format"] == "text" and d["tokenizer"] == str(model_dir / "tokenizer.json")
    settings = scenario_plans(spec)[0].settings
    assert settings["shared_prefix_tokens"] == 16 and settings["replay"] is False  # what the engine audit reads
    reqs = _dataset(datasets, d)
    assert all(isinstance(r.prompt, str) and r.input_tokens == 64 for r in reqs) and len(reqs) == 5
    preset = dataset_args(parse_study(text.replace(f"path: {model_dir}", "preset: llama-3.2-1b"), "p.yaml"))
    assert preset["prompt_format"] == "token_ids" and preset["tokenizer"] is None


def test_text_prompts_cost_the_server_tokenizer_what_prose_of_their_length_does(tmp_path):
    # Drawn from every word token, a prompt had ~2x the characters per token of prose, and the server's
    # tokenizer time on a request's path grew with it (benchmarks/prompt_tokenization.py). The module's
    # 2000-id tokenizer has too few short words to say; this one has the corpus's whole vocabulary.
    tok = PromptTokenizer(make_model_dir(tmp_path / "m", vocab=8000))
    prose = prose_text()
    prose_cpt = len(prose) / len(tok.encode(prose))
    reqs = random_dataset(40, 256, 4, prompt_format="text", tokenizer=tok, seed=3)
    prompt_cpt = sum(len(r.prompt) for r in reqs) / sum(r.input_tokens - tok.specials for r in reqs)
    assert abs(prompt_cpt / prose_cpt - 1) < 0.25, (prompt_cpt, prose_cpt)
