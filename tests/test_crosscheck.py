"""benchmarks/gpu/crosscheck.py: the peers' result files and servetune's, read into one table."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from servetune.loadgen.datasets import prompt_file_dataset
from servetune.loadgen.scenarios import ScenarioSettings, schedule_for
from servetune.loadgen.tokenizer import PromptTokenizer
from test_gpu_scripts import _script
from tokenizer_fixture import make_model_dir

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).parent / "fixtures" / "crosscheck"


@pytest.fixture(scope="module")
def cc():
    return _script("crosscheck")


def test_vllm_result_read_in_its_own_and_the_common_definitions(cc):
    run = cc.load_vllm(FIX / "vllm-bench-1.json")
    raw = json.loads((FIX / "vllm-bench-1.json").read_text())
    assert run["own"]["requests_ok"] == 40 and run["own"]["ttft"]["mean"] == raw["mean_ttft_ms"]
    assert run["own"]["ttft"]["p50"] == raw["p50_ttft_ms"] and run["own"]["tpot"]["p99"] == raw["p99_tpot_ms"]
    # vLLM's TTFT counts from the send and its TPOT is (latency − TTFT) / (output − 1): recomputed from the
    # per-request lists (seconds) they are its own summary (milliseconds)
    assert run["same"]["ttft"]["mean"] == pytest.approx(raw["mean_ttft_ms"])
    assert run["same"]["ttft"]["p99"] == pytest.approx(raw["p99_ttft_ms"])
    assert run["same"]["tpot"]["mean"] == pytest.approx(raw["mean_tpot_ms"])
    assert run["same"]["output_tokens_per_s"] == pytest.approx(raw["output_throughput"], rel=0.01)
    gaps = np.diff(raw["start_times"])
    assert run["same"]["arrival_rate"] == pytest.approx(len(gaps) / gaps.sum())
    assert run["client_input_tokens"] == 128


def test_vllm_result_without_latencies_or_send_times_still_gives_the_common_definitions(cc, tmp_path):
    # the H200 run's result files had no per-request latency list: the "same definition" rows were empty (nan)
    raw = json.loads((FIX / "vllm-bench-1.json").read_text())
    for key in ("latencies", "start_times"):
        raw.pop(key)
    (tmp_path / "r.json").write_text(json.dumps(raw))
    run = cc.load_vllm(tmp_path / "r.json")
    assert run["same"]["ttft"]["mean"] == pytest.approx(raw["mean_ttft_ms"])
    assert run["same"]["tpot"]["mean"] == pytest.approx(raw["mean_tpot_ms"])
    assert np.isnan(run["same"]["arrival_rate"])
    assert "itls" in run["detail_keys"] and "latencies" not in run["detail_keys"]


def test_sglang_result_is_the_last_line_of_its_output_file(cc):
    run = cc.load_sglang(FIX / "sglang-bench-1.jsonl")
    last = json.loads((FIX / "sglang-bench-1.jsonl").read_text().splitlines()[-1])
    assert run["own"]["requests_ok"] == 40 and run["own"]["ttft"]["mean"] == last["mean_ttft_ms"] != 999.0
    assert run["same"]["ttft"]["mean"] == pytest.approx(last["mean_ttft_ms"])
    assert run["same"]["tpot"]["mean"] == pytest.approx(last["mean_tpot_ms"])
    assert np.isnan(run["same"]["arrival_rate"])  # it records no send times


def test_servetune_result_from_a_real_run(cc):
    run = cc.load_servetune(FIX / "servetune-text-1" / "result.json")
    summary = json.loads((FIX / "servetune-text-1" / "result.json").read_text())["results"][0]["summary"]
    assert run["prompt_format"] == "text" and run["own"]["ttft"]["mean"] == summary["ttft_mean_ms"]
    # from the send, both ways: servetune's own ttft_from_send and the per-request recomputation
    assert run["same"]["ttft"]["mean"] == pytest.approx(summary["ttft_from_send_mean_ms"], rel=1e-6)
    assert run["same"]["ttft"]["mean"] < run["own"]["ttft"]["mean"]  # its own counts from the schedule
    assert run["client_input_tokens"] == 128


def test_server_deltas_from_vllm_metrics(cc):
    parse = cc._parse_prometheus
    d = cc.server_delta(parse((FIX / "vllm-bench-2.before.prom").read_text()),
                        parse((FIX / "vllm-bench-2.after.prom").read_text()))
    raw = json.loads((FIX / "vllm-bench-2.json").read_text())
    assert (d["requests"], d["prompt_tokens"], d["generation_tokens"]) == (40, 40 * 128, 40 * 8)
    assert d["prefix_cache_hits"] == 16 and d["prefix_cache_hit_rate"] == pytest.approx(16 / 5120)
    assert d["ttft_mean_ms"] == pytest.approx(raw["mean_ttft_ms"] - 4.0)  # the fixture's server TTFT: 4 ms less
    assert d["queue_mean_ms"] == pytest.approx(1.0) and d["prefill_mean_ms"] == pytest.approx(12.0)
    assert d["itl_mean_ms"] == pytest.approx(raw["mean_itl_ms"])


def test_table_and_goal(cc, tmp_path):
    out = tmp_path / "cc"
    shutil.copytree(FIX, out)
    assert cc.main(["table", str(out)]) == 0
    text = (out / "crosscheck.md").read_text()
    head = text.splitlines()[0]
    assert head.startswith("| section | metric | servetune-text-1 | vllm-bench-1 | servetune-ids-1")
    assert "| server | client − server TTFT ms (outside the engine) | – | 4.0 |" in text
    assert "| server | prefix-cache hit tokens | 0 | 0 | 0 | 0 | 16 | 0 |" in text
    doc = json.loads((out / "crosscheck.json").read_text())
    goal = {g["metric"]: g for g in doc["goal"]}
    assert set(goal) == {"output tok/s", "mean TTFT", "mean TPOT", "p99 TTFT", "p99 TPOT"}
    g = goal["mean TTFT"]
    assert g["servetune_runs"] == [r["own"]["ttft"]["mean"] for r in doc["runs"]
                                   if r["name"].startswith("servetune-text")]
    assert g["diff"] == pytest.approx(g["servetune"] / g["peer"] - 1) and g["ok"] is (abs(g["diff"]) <= 0.03)
    assert "text − token ids, client TTFT mean (from send)" in text and "vllm bench − servetune text" in text


def test_crosscheck_sh_parses_and_refuses_a_bad_engine(tmp_path):
    script = ROOT / "benchmarks" / "gpu" / "crosscheck.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "http://127.0.0.1:9", "/nowhere", "tgi", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "vllm or sglang" in r.stderr


def test_poisson_exact_arrivals_keep_the_draws_and_land_on_the_nominal_span():
    raw = [t for _, _, t in schedule_for(ScenarioSettings(kind="server", qps=20, num_requests=1200, seed=3), 100)]
    exact = [t for _, _, t in schedule_for(ScenarioSettings(kind="server", qps=20, num_requests=1200, seed=3,
                                                            arrival="poisson_exact"), 100)]
    assert exact[-1] == pytest.approx(1199 / 20) and raw[-1] != pytest.approx(1199 / 20, rel=1e-3)
    assert np.allclose(np.asarray(exact) / exact[-1], np.asarray(raw) / raw[-1])  # the same draws, rescaled


def test_a_paired_run_is_compared_with_the_peer_run_whose_arrivals_it_replayed(cc):
    def run(name: str, ttft_mean: float, ttft_p99: float, tpot_p99: float) -> dict:
        return {"name": name, "tool": name.split("-")[0],
                "own": {"ttft": {"mean": ttft_mean, "p99": ttft_p99}, "tpot": {"p99": tpot_p99}}}

    runs = [run("vllm-bench-1", 90.0, 180.0, 14.0), run("servetune-paired-1", 92.0, 198.0, 14.0),
            run("vllm-bench-2", 91.0, 170.0, 15.0), run("servetune-paired-3", 1.0, 1.0, 1.0)]  # no peer run 3
    notes = cc.paired_notes(runs, "vllm")
    assert notes == ["- servetune-paired-1 − vllm-bench-1 (same arrivals), mean TTFT: +2.0 ms (+2.2%)",
                     "- servetune-paired-1 − vllm-bench-1 (same arrivals), p99 TTFT: +18.0 ms (+10.0%)",
                     "- servetune-paired-1 − vllm-bench-1 (same arrivals), p99 TPOT: +0.0 ms (+0.0%)"]


def test_a_same_run_sends_the_peers_kind_of_prompts_as_listed_and_is_compared_with_its_peer_run(cc, tmp_path):
    # without vLLM (CI) the prompts come from the copy of vLLM's RandomDataset recipe that
    # benchmarks/prompt_tokenization.py measures; on a GPU host from vLLM's own RandomDataset, same seed
    model = make_model_dir(tmp_path / "m")
    out = tmp_path / "peer-prompts-1.json"
    assert cc.main(["peer-prompts", str(model), str(out), "--num", "12", "--input-tokens", "64",
                    "--output-tokens", "8", "--seed", "1"]) == 0
    tok = PromptTokenizer(model)
    reqs = prompt_file_dataset(out, 8, ignore_eos=True, tokenizer=tok)
    # every prompt, as the recipe made it (one of these has no space at all: ShareGPT's reader would drop it);
    # its decode / re-encode rounds leave a prompt a token off now and then, as vLLM's do, and bench counts
    # each exactly (the server's BOS included)
    assert len(reqs) == 12 and min(len(str(r.prompt).split()) for r in reqs) == 1
    assert {r.input_tokens for r in reqs} <= {63, 64, 65} and 64 in {r.input_tokens for r in reqs}
    again, _ = cc.peer_prompts(str(model), 12, 64, 8, 1)
    other, _ = cc.peer_prompts(str(model), 12, 64, 8, 2)
    assert again == json.loads(out.read_text()) != other

    def run(name, ttft):
        return {"name": name, "tool": "x", "own": {"ttft": {"mean": ttft, "p99": 2 * ttft},
                                                   "tpot": {"mean": 10.0, "p99": 12.0}}}

    notes = cc.paired_notes([run("vllm-bench-1", 80.0), run("servetune-same-1", 78.0)], "vllm")
    assert notes[0] == "- servetune-same-1 − vllm-bench-1 (same prompts and arrivals), mean TTFT: -2.0 ms (-2.5%)"


def test_the_same_prompt_runs_get_their_own_goal_table(cc):
    def run(name, tool, tps, ttft):
        return {"name": name, "tool": tool, "own": {"output_tokens_per_s": tps, "ttft": {"mean": ttft, "p99": 3 * ttft},
                                                    "tpot": {"mean": 10.0, "p99": 12.0}}}

    runs = [run("servetune-text-1", "servetune", 1000.0, 70.0), run("vllm-bench-1", "vllm", 1000.0, 76.0),
            run("servetune-same-1", "servetune", 1001.0, 75.0), run("servetune-text-2", "servetune", 1000.0, 71.0),
            run("vllm-bench-2", "vllm", 1002.0, 78.0), run("servetune-same-2", "servetune", 1002.0, 77.0)]
    text_goal = {g["metric"]: g for g in cc.goal(runs, "vllm")}
    same_goal = {g["metric"]: g for g in cc.goal(runs, "vllm", "servetune-same-")}
    assert text_goal["mean TTFT"]["servetune_runs"] == [70.0, 71.0] and not text_goal["mean TTFT"]["ok"]
    assert same_goal["mean TTFT"]["servetune_runs"] == [75.0, 77.0] and same_goal["mean TTFT"]["ok"]
    assert same_goal["mean TTFT"]["diff"] == pytest.approx(76.0 / 77.0 - 1)
    md = cc.render(runs, "vllm")
    assert md.count("Goal: ") == 2 and "Goal: servetune sending each peer run's prompts at that run's arrivals" in md
    # without same-prompt runs there is one table, as before
    assert cc.render(runs[:2] + runs[3:5], "vllm").count("Goal: ") == 1


def test_a_run_that_hit_the_prefix_cache_fails_its_goal_table(cc):
    # 2026-12-06: the same-prompt replays came right after the peer run that sent those prompts and found 9.6 %
    # of them cached; their TTFT was 9.5 % under the peer's for that reason alone
    def run(name, tool, ttft, hit_rate):
        return {"name": name, "tool": tool, "server": {"prefix_cache_hit_rate": hit_rate},
                "own": {"output_tokens_per_s": 1000.0, "ttft": {"mean": ttft, "p99": 3 * ttft},
                        "tpot": {"mean": 10.0, "p99": 12.0}}}

    runs = [run("vllm-bench-1", "vllm", 76.0, 0.001), run("servetune-same-1", "servetune", 75.0, 0.096)]
    checks = cc.goal(runs, "vllm", "servetune-same-")
    assert all(not c["ok"] and c["prefix_cached_runs"] == ["servetune-same-1"] for c in checks)
    assert "Not a comparison: servetune-same-1 found over 1 % of their prompt tokens" in cc.render(runs, "vllm")
    runs[1]["server"]["prefix_cache_hit_rate"] = 0.0
    assert {c["metric"]: c["ok"] for c in cc.goal(runs, "vllm", "servetune-same-")}["mean TTFT"]


def test_a_results_folder_copied_elsewhere_finds_its_files_beside_runs_tsv(cc, tmp_path):
    # runs.tsv holds the host's absolute paths; docs/results keeps the folder somewhere else
    out = tmp_path / "kept"
    shutil.copytree(FIX, out)
    rows = [line.split("\t") for line in (out / "runs.tsv").read_text().splitlines() if line.strip()]
    (out / "runs.tsv").write_text("".join("\t".join([r[0], r[1], "/tmp/res/crosscheck/" + r[2], *r[3:]]) + "\n"
                                          for r in rows))
    runs = cc.load_runs(out)
    assert runs and not any("error" in r for r in runs)
    assert [r["own"]["requests_ok"] for r in runs] == [r["own"]["requests_ok"] for r in cc.load_runs(FIX)]
