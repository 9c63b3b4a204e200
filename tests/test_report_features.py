"""reports/: drill-down data, what the SLA costs, roofline fractions, comparisons and the report CLI (no browser)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from report_fixtures import EXPECTED, HOSTILE, OOM_REASON, write_run
from servetune.reports import load_run
from servetune.reports.analysis import sla_costs
from servetune.reports.charts import chart_specs, pareto_chart
from servetune.reports.compare import best_table, labels, match_scenarios, render_compare, write_compare
from servetune.reports.details import command_parts, read_latencies, trial_detail
from servetune.reports.html import render_report, scenario_verdict
from servetune.reports.model import Scenario
from servetune.reports.roofline import estimate, fractions


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def _row(run, n):
    return run.trials[run.trials["number"].eq(n)].iloc[0]


# -- what the SLA costs -------------------------------------------------------------------------------------

def test_sla_cost_best_with_and_without_each_limit(run):
    costs = {(c.scenario, c.metric): c for c in sla_costs(run)}
    assert ("offline", "output_tokens_per_s") not in costs  # no SLA, nothing to cost
    c = costs[("server-16", "output_tokens_per_s")]
    (free_n, free_v), (sla_n, sla_v) = EXPECTED["server16_sla_cost"]
    assert [r.constraint.split(" ≤")[0] for r in c.rows] == ["no latency limit", "p99 TTFT", "p99 TPOT",
                                                             "the SLA: p99 TTFT"]
    assert (c.rows[0].trial, c.rows[0].best) == (free_n, free_v)
    assert (c.rows[-1].trial, c.rows[-1].best) == (sla_n, sla_v)
    assert c.rows[2].trial == free_n  # TPOT alone costs nothing here: every trial is within 100 ms
    assert c.rows[-1].cost_text == f"−{1 - sla_v / free_v:.1%}" and c.rows[0].cost_text == "free"
    assert c.rows[0].n == 11 and c.rows[-1].n == 11 - len(EXPECTED["server16_sla_missed"])
    assert c.rows[-1].best_text == "2,030 tok/s"


# -- roofline fraction --------------------------------------------------------------------------------------

def test_roofline_fraction_is_an_upper_bound_that_grows_with_concurrency(run):
    got = fractions(run, "offline")
    assert set(got) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13}  # every trial that measured offline
    for n, e in got.items():
        assert e.fraction is not None and 0 < e.fraction < 1, (n, e)
        assert e.bound_tok_s <= e.bound_at_max_tok_s * 1.0001
        assert e.concurrency_source.startswith("measured")
    # same config, more sequences in flight: a higher bound (decode is memory-bound, weights read once)
    e6 = got[6]
    assert e6.bound_kind in ("memory", "compute")
    # the server scenario runs at a far lower concurrency than offline, so its bound is far lower
    srv = estimate(run, _row(run, 6), "server")
    assert srv.concurrency < e6.concurrency and srv.bound_tok_s < e6.bound_tok_s


def test_roofline_says_why_when_unavailable(run):
    assert estimate(run, _row(run, 9), "offline").note == "not measured"  # the OOM trial
    odd = load_run(run.run_dir)
    odd.spec = {**odd.spec, "hardware": {"gpu": "tpu-v9"}}
    e = estimate(odd, _row(odd, 3), "offline")
    assert e.fraction is None and "unknown GPU" in e.note


def test_roofline_column_in_table(run):
    html = render_report(run, mode="serve")
    assert "roofline (est.)" in html and "estimate" in html


# -- the drill-down ------------------------------------------------------------------------------------------

def test_trial_detail_config_diff_command_and_curves(run):
    d = trial_detail(run, 3)
    diff = {c["name"]: c for c in d["config"]}
    assert diff["tensor_parallel"] == {"name": "tensor_parallel", "value": "2", "baseline": "1", "differs": True}
    assert [c["name"] for c in d["config"] if not c["differs"]] == []  # trial 3 changed every parameter
    assert not next(c for c in trial_detail(run, 13)["config"] if c["name"] == "tensor_parallel")["differs"]
    assert d["command"].startswith("python -m servetune.optimizer.engines.sim")
    changed = [p["text"] for p in d["command_parts"] if p["changed"]]
    assert changed == ["--tensor-parallel 2"]  # the baseline ran tp 1
    names = [s["name"] for s in d["scenarios"]]
    assert names == ["offline", "server", "server-16"]
    srv = d["scenarios"][1]
    assert srv["verdict"]["sla"] == "met" and srv["verdict"]["valid"] == "valid"
    assert any(m["name"] == "p99 TPOT" and m["value"] == "15 ms" for m in srv["metrics"])
    assert srv["roofline"]["fraction"] is not None and srv["roofline"]["text"].endswith("%")
    # two server load levels (8 and 16 q/s): the per-load curve, and CDFs of every scenario
    load = d["figures"]["load"]
    assert load["data"][0]["x"] == [8.0, 16.0] and load["data"][0]["y"] == [1015.0, 2025.0]
    cdf = d["figures"]["cdf"]
    assert {t["name"] for t in cdf["data"]} == {"offline", "server", "server-16"}
    assert "template" not in cdf["layout"]  # the page holds the template once
    deltas = {r["name"]: r for r in d["deltas"]["rows"]}
    assert d["deltas"]["scenarios"] == ["server", "server-16"]
    assert deltas["vllm:prompt_tokens_total"]["total"] == "286,720"
    assert deltas["vllm:prompt_tokens_total"]["per_scenario"] == ["61,440", "122,880"]
    assert "starting sim engine tp=2" in d["log_tail"]


def test_trial_detail_of_failed_rejected_and_baseline(run):
    d = trial_detail(run, 9)
    assert d["failure"] == {"kind": "oom", "reason": OOM_REASON}
    assert "torch.OutOfMemoryError" in d["log_tail"] and d["scenarios"] == [] and "cdf" not in d["figures"]
    r = trial_detail(run, 10)
    assert r["failure"]["kind"] == "rejected" and r["command"] == "" and r["log_tail"] == ""
    b = trial_detail(run, 0)
    assert b["is_baseline"] and not any(p["changed"] for p in b["command_parts"])
    assert trial_detail(run, 99) is None


def test_latency_records_exclude_failed_requests(run_dir):
    lat = read_latencies(run_dir / "trials" / "0003" / "requests_server.csv")
    n = EXPECTED["csv_requests"]
    assert {k: len(v) for k, v in lat.items()} == {"ttft_ms": n, "tpot_ms": n, "e2e_ms": n}
    assert np.max(lat["ttft_ms"]) == pytest.approx(95.0)  # the summary's p99 TTFT
    assert read_latencies(run_dir / "trials" / "0003" / "requests_nowhere.csv") == {}


def test_latency_records_of_an_older_shape(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("index,scheduled,first_byte,done,status\n0,0.0,0.1,1.0,ok\n1,0.5,0.7,2.5,ok\n2,1,,,timeout\n")
    lat = read_latencies(p)
    assert lat["ttft_ms"].tolist() == pytest.approx([100.0, 200.0])
    assert lat["e2e_ms"].tolist() == pytest.approx([1000.0, 2000.0])


def test_command_parts_mark_flags_the_baseline_lacks():
    parts = command_parts(["vllm", "serve", "m", "--max-num-seqs", "64", "--enforce-eager"],
                          ["vllm", "serve", "m", "--max-num-seqs", "256"])
    assert [(p["text"], p["changed"]) for p in parts] == [
        ("vllm", False), ("serve", False), ("m", False), ("--max-num-seqs 64", True), ("--enforce-eager", True)]
    assert command_parts(["a", "it's"], None)[1]["text"] == "'it'\"'\"'s'"  # shell-quoted for copying
    # each trial gets its own port: not a configuration difference
    assert not command_parts(["s", "--port", "5001"], ["s", "--port", "5002"])[1]["changed"]


def test_static_report_inlines_drilldowns_and_escapes(run):
    html = render_report(run)
    m = re.search(r'<script type="application/json" id="st-details">(.*?)</script>', html, re.S)
    details = json.loads(m.group(1))
    assert set(details) == {str(n) for n in range(EXPECTED["trials"])}
    assert details["5"]["config"][-1]["value"] == HOSTILE  # raw in the data, inserted as text by the page
    assert HOSTILE not in html  # ... and never literally in the HTML (tojson escapes < >)
    server = next(s for s in run.scenarios if s.name == "server")
    assert scenario_verdict(run, server).split(" (")[0] in html


def test_scenario_verdict(run):
    server = next(s for s in run.scenarios if s.name == "server")
    assert scenario_verdict(run, server).startswith("valid runs (MLPerf rules): 9 of 11")


# -- comparing two studies -----------------------------------------------------------------------------------

def test_compare_two_studies(tmp_path, run_dir):
    other = write_run(tmp_path / "other", with_db=False)
    a, b = load_run(run_dir), load_run(other)
    assert labels(a, b) == (run_dir.name, "other")  # same study name: told apart by folder
    pairs, notes = match_scenarios(a, b)
    assert [(x.name, y.name) for x, y in pairs] == [("offline", "offline"), ("server", "server"),
                                                    ("server-16", "server-16")] and notes == []
    rows = best_table([type("S", (), {"run": a})(), type("S", (), {"run": b})()], pairs)
    first = rows[0]
    assert (first["scenario"], first["metric"], first["a"], first["ratio"]) == (
        "offline", "output tokens/s/GPU", "4,300 tok/s/GPU", "1.00×")
    html = render_compare(a, b)
    figs = json.loads(re.search(r'id="st-figures">(.*?)</script>', html, re.S).group(1))
    fig = figs["cmp1-0"]
    names = [t["name"] for t in fig["data"]]
    assert f"{run_dir.name}: Pareto front" in names and "other: Pareto front" in names
    assert all(len(t["customdata"][0]) == 3 for t in fig["data"])  # [hover, trial, "A"|"B"]
    assert HOSTILE not in html


def test_compare_matches_scenarios_by_kind():
    a = SimpleNamespace(scenarios=[Scenario("offline", "offline"), Scenario("server", "server", qps=8)])
    b = SimpleNamespace(scenarios=[Scenario("batch", "offline"), Scenario("chat", "interactive", qps=2)])
    pairs, notes = match_scenarios(a, b)
    assert [(x.name, y.name) for x, y in pairs] == [("offline", "batch")]
    assert notes == ["scenario server is only in A", "scenario chat is only in B"]


def test_write_compare_file(tmp_path, run_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where it lands: by default, beside the runs (issue 17.8)
    out = write_compare(run_dir, run_dir)
    assert out == Path(run_dir).resolve().parent / f"compare-{Path(run_dir).name}-vs-{Path(run_dir).name}.html"
    text = out.read_text()
    assert "(A)" in text and "(B)" in text and not re.search(r"<script[^>]*\bsrc\s*=", text)


# -- the command line ----------------------------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "servetune.optimizer.cli", "report", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_cli_report_and_compare(tmp_path, run_dir):
    p = _cli(str(run_dir), "-o", str(tmp_path / "r.html"))
    assert p.returncode == 0 and (tmp_path / "r.html").is_file(), p.stderr
    p = _cli("compare", str(run_dir), str(run_dir), "-o", str(tmp_path / "c.html"))
    assert p.returncode == 0 and "comparison:" in p.stdout and (tmp_path / "c.html").is_file(), p.stderr
    p = _cli("compare", str(run_dir))
    assert p.returncode == 2 and "takes two run directories" in p.stderr
    p = _cli(str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "not a servetune run directory" in p.stderr
    p = _cli("serve", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "not a folder" in p.stderr


def test_cli_run_dir_named_like_a_subcommand(tmp_path, run_dir):
    shutil.copytree(run_dir, tmp_path / "compare")
    p = _cli("compare", cwd=tmp_path)  # a run directory called "compare" still gets its report
    assert p.returncode == 0 and (tmp_path / "compare" / "report.html").is_file(), p.stderr


def test_runs_valid_only_without_early_stopping_are_not_labelled_mlperf_valid_and_rates_start_at_zero(run):
    """Issue 17.8: a search trial's level that met the study's checks but not MLPerf's early stopping (a note,
    not a reason) is not counted as valid under MLPerf's rules; throughput axes start at 0."""
    server = next(s for s in run.scenarios if s.name == "server")
    before = scenario_verdict(run, server)
    t = run.trials.copy()
    i = t.index[t["server.valid"].eq(True)][0]
    t.loc[i, "server.notes"] = "TTFT early stopping not met (n=120, need 459 with 0 over the 2000 ms limit at p99)"
    short = replace(run, trials=t)
    assert before.startswith("valid runs (MLPerf rules): 9 of 11")
    assert scenario_verdict(short, server).startswith("valid runs (MLPerf rules): 8 of 11; 1 more passed the study's "
                                                      "checks but ran too short for MLPerf's early stopping")
    for spec in chart_specs():
        chart = pareto_chart(run, server, spec, "c")
        layout = chart.figure["layout"]
        assert layout["yaxis"].get("rangemode") == "tozero" or layout["yaxis"].get("type") == "log"
        assert ("rangemode" in layout["xaxis"]) == (spec.x == "tokens_per_s_per_user" and
                                                    layout["xaxis"].get("type") != "log")
