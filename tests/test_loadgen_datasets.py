"""Datasets: exact lengths, unique salts, determinism, and clear errors for bad files."""
import json

import pytest

from servetune.loadgen.client import request_body
from servetune.loadgen.datasets import (
    SAFE_ID_LOW,
    SALT_TOKENS,
    SALT_WORDS,
    WORDS,
    prompt_file_dataset,
    random_dataset,
    sharegpt_dataset,
    text_corpus,
    text_task_dataset,
    token_id_dataset,
    with_temperature,
)
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.tokenizer import PromptTokenizer
from servetune.optimizer.engines.sim.answer import find_source
from tokenizer_fixture import make_model_dir


def test_random_token_ids_exact_lengths_and_safe_range():
    reqs = random_dataset(50, input_tokens=64, output_tokens=32, vocab_size=32000)
    assert len(reqs) == 50
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.input_tokens == 64
        assert r.max_tokens == 32 and r.ignore_eos is True
        assert all(SAFE_ID_LOW <= t < 32000 for t in r.prompt)


def test_random_salts_unique_and_seeded():
    reqs = random_dataset(2000, input_tokens=8, output_tokens=4, vocab_size=1200)  # small alphabet: collisions likely
    salts = {tuple(r.prompt[:SALT_TOKENS]) for r in reqs}
    assert len(salts) == 2000
    again = random_dataset(2000, input_tokens=8, output_tokens=4, vocab_size=1200)
    assert [r.prompt for r in reqs] == [r.prompt for r in again]
    other = random_dataset(2000, input_tokens=8, output_tokens=4, vocab_size=1200, seed=1)
    assert reqs[0].prompt != other[0].prompt


def test_random_short_prompts_are_all_salt_and_still_unique():
    reqs = random_dataset(500, input_tokens=2, output_tokens=1)
    assert len({tuple(r.prompt) for r in reqs}) == 500
    with pytest.raises(ValueError, match="distinct salts"):
        random_dataset(100, input_tokens=1, output_tokens=1, vocab_size=1050)


def test_random_ranges():
    reqs = random_dataset(400, input_tokens=100, output_tokens=50, input_range=0.5, output_range=0.2, seed=3)
    ins, outs = [r.input_tokens for r in reqs], [r.max_tokens for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and len(set(ins)) > 20
    assert min(outs) >= 40 and max(outs) <= 60
    assert all(len(r.prompt) == r.input_tokens for r in reqs)
    with pytest.raises(ValueError):
        random_dataset(4, input_tokens=10, output_tokens=10, input_range=1.5)
    with pytest.raises(ValueError):
        random_dataset(0, input_tokens=10, output_tokens=10)


def test_random_text_mode_word_per_token():
    reqs = random_dataset(300, input_tokens=40, output_tokens=8, prompt_format="text", ignore_eos=False)
    for r in reqs:
        words = r.prompt.split(" ")
        assert len(words) == r.input_tokens == 40 and all(w in WORDS for w in words)
        assert r.ignore_eos is False
    assert len({tuple(r.prompt.split()[:SALT_WORDS]) for r in reqs}) == 300


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _conv(human, gpt):
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_sharegpt_json_and_jsonl(tmp_path):
    items = [_conv(f"question number {i} about some topic here", " ".join(["word"] * (5 + i))) for i in range(10)]
    items.append({"conversations": [{"from": "gpt", "value": "starts with the model, skipped"},
                                    {"from": "human", "value": "x y z w"}]})
    items.append(_conv("too short", "answer with enough words"))  # prompt under min_words
    items.append({"id": "no conversations"})
    js = _write(tmp_path / "sg.json", json.dumps(items))
    jl = _write(tmp_path / "sg.jsonl", "\n".join(json.dumps(i) for i in items) + "\n\n")
    for path in (js, jl):
        reqs = sharegpt_dataset(path, n=10, seed=0)
        assert len(reqs) == 10
        assert sorted(r.max_tokens for r in reqs) == list(range(5, 15))
        assert all(r.input_tokens == 7 and r.prompt.startswith("question") for r in reqs)
        assert all(r.ignore_eos is False for r in reqs)
    capped = sharegpt_dataset(js, n=10, max_output_tokens=8)
    assert max(r.max_tokens for r in capped) == 8
    picks = [[r.prompt for r in sharegpt_dataset(js, n=5, seed=seed)] for seed in (1, 2)]
    assert picks[0] != picks[1]
    with pytest.raises(ValueError, match="only 10 usable"):
        sharegpt_dataset(js, n=11)


def test_sharegpt_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        sharegpt_dataset(tmp_path / "missing.json", n=1)
    with pytest.raises(ValueError, match="not valid JSON"):
        sharegpt_dataset(_write(tmp_path / "bad.json", "[{"), n=1)
    with pytest.raises(ValueError, match="line 2"):
        sharegpt_dataset(_write(tmp_path / "bad.jsonl", '{"a": 1}\n{oops\n'), n=1)
    with pytest.raises(ValueError, match="no ShareGPT conversations"):
        sharegpt_dataset(_write(tmp_path / "none.jsonl", '{"a": 1}\n'), n=1)
    with pytest.raises(ValueError, match="empty"):
        sharegpt_dataset(_write(tmp_path / "empty.json", "  \n"), n=1)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="cannot read"):
        sharegpt_dataset(tmp_path / "bin.json", n=1)


def test_token_id_dataset(tmp_path):
    path = _write(tmp_path / "ids.jsonl", '{"prompt_token_ids": [5, 6, 7], "max_tokens": 4}\n\n'
                                          '{"prompt_token_ids": [9], "max_tokens": 1, "ignore_eos": true}\n')
    reqs = token_id_dataset(path)
    assert [(r.prompt, r.max_tokens, r.input_tokens, r.ignore_eos) for r in reqs] == [
        ([5, 6, 7], 4, 3, False), ([9], 1, 1, True)]


@pytest.mark.parametrize("line, match", [
    ('{"max_tokens": 4}', "prompt_token_ids"),
    ('{"prompt_token_ids": [], "max_tokens": 4}', "prompt_token_ids"),
    ('{"prompt_token_ids": [1, "a"], "max_tokens": 4}', "prompt_token_ids"),
    ('{"prompt_token_ids": [1, -2], "max_tokens": 4}', "prompt_token_ids"),
    ('{"prompt_token_ids": [1], "max_tokens": 0}', "max_tokens"),
    ('{"prompt_token_ids": [1], "max_tokens": 2.5}', "max_tokens"),
    ('{"prompt_token_ids": [1], "max_tokens": 2, "ignore_eos": "yes"}', "ignore_eos"),
    ('[1, 2]', "expected an object"),
    ('{"prompt_token_ids": [1], "max_tokens": 2', "not valid JSON"),
])
def test_token_id_dataset_malformed(tmp_path, line, match):
    path = _write(tmp_path / "ids.jsonl", '{"prompt_token_ids": [1], "max_tokens": 2}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        token_id_dataset(path)


def test_a_prompt_file_is_sent_as_listed_repeats_and_odd_prompts_included(tmp_path):
    # vLLM's random prompts, made with the kit's tokenizer, hold a few repeats and prompts without a space per
    # 1,000; ShareGPT's reader drops both, this one must not (it replays another client's requests)
    path = _write(tmp_path / "p.jsonl", '"b a"\n{"prompt": "x=1;y=2"}\n"b a"\n'
                                        '{"prompt": "c d e", "max_tokens": 3, "ignore_eos": true}\n')
    reqs = prompt_file_dataset(path, 8)
    assert [(r.prompt, r.max_tokens, r.input_tokens, r.ignore_eos) for r in reqs] == [
        ("b a", 8, 2, False), ("x=1;y=2", 8, 1, False), ("b a", 8, 2, False), ("c d e", 3, 3, True)]
    assert [r.prompt for r in prompt_file_dataset(_write(tmp_path / "p.json", '["q", "r"]'), 2)] == ["q", "r"]


def test_a_prompt_files_lengths_are_exact_with_the_models_tokenizer(tmp_path):
    tok = PromptTokenizer(make_model_dir(tmp_path / "m"))
    texts = [str(r.prompt) for r in random_dataset(5, 40, 4, prompt_format="text", tokenizer=tok, seed=1)]
    path = _write(tmp_path / "p.json", json.dumps(texts))
    assert {r.input_tokens for r in prompt_file_dataset(path, 4, tokenizer=tok)} == {40}


@pytest.mark.parametrize("line, match", [
    ('""', "non-empty string"), ('{"max_tokens": 4}', "'prompt' string"), ("[1]", "'prompt' string"),
    ('{"prompt": "a", "max_tokens": 0}', "max_tokens"), ('{"prompt": "a", "ignore_eos": 1}', "ignore_eos"),
])
def test_a_malformed_prompt_file_names_the_record(tmp_path, line, match):
    with pytest.raises(ValueError, match=f"record 2: .*{match}"):
        prompt_file_dataset(_write(tmp_path / "p.jsonl", '"ok"\n' + line + "\n"), 4)


# -- text tasks (speculative decoding's workloads) ----------------------------------------------------------

def test_text_tasks_quote_their_source_and_ask_for_about_its_length():
    corpus = text_corpus()
    assert all(p["source"] and p["text"] for p in corpus["passages"]) and corpus["topics"]
    reqs = text_task_dataset(40, tasks=["rewrite", "summarize", "code_edit"], output_tokens=1000, seed=3)
    assert len({r.prompt.split("\n", 1)[0] for r in reqs}) == 40  # a request number first: no shared prefix block
    texts = {" ".join(p["text"].split()): p for p in corpus["passages"]}
    for r in reqs:
        source = " ".join(find_source(r.prompt.split()))
        p = texts[source]  # the quoted source is one shipped passage, whole
        words = len(p["text"].split())
        assert r.max_tokens in (words, words // 2) and r.ignore_eos and r.temperature is None
    kinds = {texts[" ".join(find_source(r.prompt.split()))]["kind"] for r in reqs}
    assert kinds == {"prose", "code"}
    free = text_task_dataset(5, tasks=["freeform"], output_tokens=64)
    assert all(find_source(r.prompt.split()) == [] and r.max_tokens == 64 for r in free)
    assert text_task_dataset(40, seed=3) == text_task_dataset(40, seed=3)
    with pytest.raises(ValueError, match="tasks must be some of"):
        text_task_dataset(3, tasks=["poetry"])


def test_a_temperature_rides_with_every_request():
    ep = Endpoint(base_url="http://127.0.0.1:1", model="m")
    reqs = text_task_dataset(2, tasks=["freeform"])
    assert "temperature" not in request_body(ep, reqs[0])
    assert request_body(ep, with_temperature(reqs, 0)[0])["temperature"] == 0.0
