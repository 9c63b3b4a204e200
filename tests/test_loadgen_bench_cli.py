"""``servetune bench``: argument handling, secrets kept out of files, the three modes, output files."""
import argparse
import json
import subprocess
import sys

import pandas as pd
import pytest

from loadgen_mock import MockServer
from servetune.loadgen.scenario_kinds import ScenarioKind
from servetune.optimizer.cli import bench as bench_cli
from servetune.optimizer.cli.bench import BenchCommand, UsageError, main, redacted_argv, resolve_header
from servetune.optimizer.cli.command import register


@pytest.fixture(scope="module")
def mock():
    with MockServer() as m:
        yield m


def _mock_body(**kw) -> str:
    return json.dumps({"mock": {"ttft_s": 0.005, "tpot_s": 0.001, **kw}})


def test_parser_is_light_and_in_step_with_loadgen():
    assert bench_cli.SCENARIOS == ScenarioKind.names()  # the --scenario choices are the registered kinds
    code = ("import argparse, sys; from servetune.optimizer.cli.bench import BenchCommand; "
            "BenchCommand.add_cli_args(argparse.ArgumentParser()); print('aiohttp' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_add_parser_registers_bench():
    p = argparse.ArgumentParser(prog="servetune")
    register(p.add_subparsers(dest="command"), BenchCommand)
    args = p.parse_args(["bench", "--url", "http://h:1", "--model", "m", "-o", "x", "--concurrency", "1,2,4"])
    assert args.command_class is BenchCommand and args.concurrency == [1, 2, 4]
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--url", "http://h:1", "--model", "m", "-o", "x", "--concurrency", "0"])


def test_header_resolution_and_redaction():
    env = {"TOKEN": "sk-live-123"}
    assert resolve_header("Authorization: Bearer ${TOKEN}", env) == ("Authorization", "Bearer sk-live-123")
    assert resolve_header("X-Plain:  v", env) == ("X-Plain", "v")
    with pytest.raises(UsageError, match="MISSING"):
        resolve_header("Authorization: Bearer ${MISSING}", env)
    with pytest.raises(UsageError, match="Name: value"):
        resolve_header("no colon here", env)
    argv = ["--url", "https://u:pw@h:8/v1?key=k", "--header", "Authorization: Bearer sk-raw", "--header=X-K: s"]
    assert redacted_argv(argv) == ["--url", "https://h:8/v1", "--header", "Authorization: ***", "--header=X-K: ***"]


def test_single_run_writes_result_and_records(mock, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_TOKEN", "sk-never-written")
    out = tmp_path / "out"
    rc = main(["--url", mock.url, "--model", "mock", "--scenario", "server", "--qps", "40", "--num-requests", "12",
               "--input-tokens", "16", "--output-tokens", "6", "--dataset-size", "8", "--sla", "llama3.1-8b",
               "--no-early-stopping", "--header", "Authorization: Bearer ${BENCH_TOKEN}",
               "--extra-body", _mock_body(), "-o", str(out)])
    assert rc == 0
    text = (out / "result.json").read_text()
    printed = capsys.readouterr()
    assert "sk-never-written" not in text and "sk-never-written" not in printed.out + printed.err
    # progress, as plain lines on stderr when it is not a terminal: the level starting, then its result
    assert "level 1 of 1 at 40 req/s: started" in printed.err
    assert "level 1: " in printed.err and "— valid (" in printed.err
    assert mock.stats()["last_auth"] == "Bearer sk-never-written"  # sent on the wire all the same
    doc = json.loads(text)
    assert doc["mode"] == "single" and doc["endpoint"]["header_names"] == ["Authorization"]
    res = doc["results"][0]
    assert res["valid"] and res["settings"]["ttft_limit_ms"] == 2000.0 and res["summary"]["requests_ok"] == 12
    assert doc["dataset"]["ignore_eos"] == [True]
    frame = pd.read_parquet(out / "requests.parquet")
    assert len(frame) == 12 and set(frame["level"]) == {0} and frame["status"].eq("ok").all()


def test_find_max_qps_mode(mock, tmp_path):
    out = tmp_path / "search"
    rc = main(["--url", mock.url, "--model", "mock", "--find-max-qps", "--qps-lo", "10", "--qps-hi", "200",
               "--qps-tolerance", "0.3", "--duration", "0.4", "--arrival", "constant", "--ttft-ms", "60",
               "--input-tokens", "8", "--output-tokens", "8", "--dataset-size", "10", "--no-early-stopping",
               "--extra-body", _mock_body(ttft_s=0.01, tpot_s=0.002, capacity=2), "--records-format", "csv",
               "-o", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["mode"] == "find_max_qps" and doc["best_qps"] is not None and 10 <= doc["best_qps"] < 200
    frame = pd.read_csv(out / "requests.csv")
    assert frame["level"].nunique() == len(doc["results"]) >= 3
    assert sorted(frame["level_qps"].unique()) == sorted(r["settings"]["qps"] for r in doc["results"])


def test_concurrency_sweep_mode_and_usage_errors(mock, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["--url", mock.url, "--model", "mock", "--api", "chat", "--concurrency", "1,3", "--num-requests", "6",
               "--input-tokens", "8", "--output-tokens", "4", "--dataset-size", "6", "--extra-body", _mock_body(),
               "-o", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["mode"] == "concurrency_sweep" and [p["concurrency"] for p in doc["points"]] == [1, 3]
    base = ["--url", mock.url, "--model", "mock", "-o", str(tmp_path / "bad")]
    assert main(base + ["--header", "Authorization: Bearer ${SURELY_NOT_SET_VAR}"]) == 2
    assert main(base + ["--find-max-qps", "--qps-lo", "1"]) == 2  # needs --qps-hi
    assert main(base + ["--scenario", "offline", "--find-max-qps", "--qps-hi", "5"]) == 2
    assert main(base + ["--dataset", "sharegpt"]) == 2  # needs --dataset-path
    assert main(base + ["--scenario", "server"]) == 2  # needs a rate
    err = capsys.readouterr().err
    assert "SURELY_NOT_SET_VAR" in err and "needs --dataset-path" in err


def test_all_requests_failing_exits_1(mock, tmp_path):
    rc = main(["--url", mock.url, "--model", "mock", "--num-requests", "3", "--dataset-size", "3",
               "--input-tokens", "4", "--output-tokens", "2", "--extra-body", json.dumps({"mock": {"mode": "http500"}}),
               "-o", str(tmp_path / "fail"), "--quiet"])
    assert rc == 1
    doc = json.loads((tmp_path / "fail" / "result.json").read_text())
    assert doc["results"][0]["summary"]["errors_http_500"] == 3 and not doc["results"][0]["valid"]


def test_an_arrival_trace_is_replayed_as_given(mock, tmp_path):
    # vLLM's result file keeps each request's start as a perf-counter reading: only the gaps mean anything
    starts = [1000.0 + t for t in (0.0, 0.01, 0.012, 0.013, 0.2, 0.21, 0.5, 0.52)]
    trace = tmp_path / "vllm-result.json"
    trace.write_text(json.dumps({"start_times": starts, "ttfts": []}))
    out = tmp_path / "trace"
    rc = main(["--url", mock.url, "--model", "mock", "--scenario", "server", "--arrival-trace", str(trace),
               "--input-tokens", "8", "--output-tokens", "4", "--dataset-size", "8", "--no-early-stopping",
               "--min-keep-up", "off", "--extra-body", _mock_body(), "--records-format", "csv", "-o", str(out),
               "--quiet"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())["results"][0]
    assert res["settings"]["arrival"] == "trace" and res["settings"]["num_requests"] == 8
    assert res["settings"]["qps"] == pytest.approx(7 / 0.52)  # the trace's mean rate
    frame = pd.read_csv(out / "requests.csv").sort_values("index")
    offsets = frame["scheduled_s"].tolist()
    assert offsets == pytest.approx([t - 1000.0 for t in starts], abs=1e-6)
    base = ["--url", mock.url, "--model", "mock", "--scenario", "server", "-o", str(tmp_path / "bad")]
    assert main(base + ["--arrival-trace", str(trace), "--num-requests", "9"]) == 2  # more than it holds
    (tmp_path / "short.json").write_text("[0.5]")
    assert main(base + ["--arrival-trace", str(tmp_path / "short.json")]) == 2
    assert main(base[:6] + ["--scenario", "offline", "--arrival-trace", str(trace), "-o", str(tmp_path / "b")]) == 2
