"""reports/: Pareto sets, the run model, and the self-contained HTML report (on a fixture run, no optimizer)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from report_fixtures import EXPECTED, HOSTILE, OOM_REASON, REJECT_REASON, SHORT_RUN_REASON, SLA_REASON, write_run
from servetune.optimizer.records import gpu_use
from servetune.reports import load_run, write_report
from servetune.reports.charts import BASELINE, FRONT, INVALID, ChartSpec, pareto_chart
from servetune.reports.html import headlines, objective_front
from servetune.reports.pareto import front, pareto_mask
from servetune.reports.units import fmt_metric, fmt_number

# -- pareto_mask ----------------------------------------------------------------------------------------------

def test_pareto_2d_minimize_both():
    v = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [6, 6]], dtype=float)
    assert pareto_mask(v, ["minimize", "minimize"]).tolist() == [True, True, True, False, False]


def test_pareto_2d_maximize_minimize_mix():
    # throughput (max) vs latency (min)
    v = np.array([[100, 10], [200, 20], [150, 25], [50, 5], [200, 30]], dtype=float)
    assert pareto_mask(v, ["maximize", "minimize"]).tolist() == [True, True, False, True, False]


def test_pareto_3d():
    v = np.array([[1, 1, 9], [1, 9, 1], [9, 1, 1], [2, 2, 9], [5, 5, 5]], dtype=float)
    # [2,2,9] is beaten by [1,1,9]; [5,5,5] trades against all three corners
    assert pareto_mask(v, ["min", "min", "min"]).tolist() == [True, True, True, False, True]


def test_pareto_ties_keep_all_equal_best_and_drop_weakly_dominated():
    v = np.array([[1, 1], [1, 1], [1, 2], [2, 1], [0, 3]], dtype=float)
    # two identical best points both stay; [1,2] and [2,1] are no better anywhere and worse somewhere
    assert pareto_mask(v, ["minimize", "minimize"]).tolist() == [True, True, False, False, True]


def test_pareto_nan_rows_never_on_front_and_never_dominate():
    v = np.array([[np.nan, 0], [5, 5], [0, np.nan], [6, 6]], dtype=float)
    assert pareto_mask(v, ["minimize", "minimize"]).tolist() == [False, True, False, False]
    assert pareto_mask(np.full((3, 2), np.nan), ["maximize", "maximize"]).tolist() == [False] * 3
    assert pareto_mask(np.empty((0, 2)), ["maximize", "minimize"]).tolist() == []


def test_pareto_single_objective_and_chunking():
    v = np.array([3.0, 7.0, 7.0, 1.0])
    assert pareto_mask(v, ["maximize"]).tolist() == [False, True, True, False]
    # more rows than one comparison block: same answer as the O(n^2) definition
    rng = np.random.default_rng(0)
    big = rng.random((1300, 2))
    got = pareto_mask(big, ["maximize", "maximize"])
    want = [not ((big >= p).all(1) & (big > p).any(1)).any() for p in big]
    assert got.tolist() == want


def test_pareto_rejects_bad_directions():
    with pytest.raises(ValueError):
        pareto_mask(np.zeros((2, 2)), ["maximize"])
    with pytest.raises(ValueError):
        pareto_mask(np.zeros((2, 2)), ["maximize", "sideways"])


def test_front_sorted_along_x_and_only_valid():
    df = pd.DataFrame({"lat": [30, 10, 20, 5, 40], "tput": [300, 100, 250, 900, 50],
                       "ok": [True, True, True, False, None]})
    f = front(df, "lat", "tput", "minimize", "maximize", only_valid_col="ok")
    assert f["lat"].tolist() == [10, 20, 30]  # the invalid (5, 900) would have dominated them all
    f_all = front(df, "lat", "tput", "minimize", "maximize")
    assert f_all["lat"].tolist() == [5]


# -- load_run -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def report(run_dir) -> str:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    return path.read_text(encoding="utf-8")


def test_load_run_table(run_dir):
    run = load_run(run_dir)
    t = run.trials
    assert run.name == "fixture-study" and run.model == "llama-3.1-8b" and run.gpu == "2 × H100"
    assert run.engines == ["sim"]  # servetune's own engine: no "sim 1"
    assert len(t) == EXPECTED["trials"] and t["number"].tolist() == list(range(EXPECTED["trials"]))
    assert run.skipped == EXPECTED["skipped"] and "0014" in run.warnings[0]
    assert run.state_counts() == {"complete": 11, "failed": 1, "rejected": 1, "running": 1}
    assert {"param.tensor_parallel", "param.max_concurrency", "param.attention_backend"} <= set(run.param_columns)
    assert t.loc[t["number"] == 9, "failure_kind"].item() == "oom"
    assert t.loc[t["number"] == 9, "failure_reason"].item() == OOM_REASON
    assert t.loc[t["number"] == 0, "failure_kind"].item() is None
    assert run.baseline()["number"] == EXPECTED["baseline"]
    assert t.loc[t["number"] == 3, "server.output_tokens_per_s_per_gpu"].item() == pytest.approx(507.5)
    assert t["server.valid"].tolist()[:2] == [True, False]  # trial 1: too short a run, SLA still met
    assert t["server.sla_met"].tolist()[9:] == [None, None, False, None, True]
    assert t.loc[t["number"] == 11, "server.sla_reason"].item() == SLA_REASON  # judged by the report
    assert run.sla_met("server").sum() == 10 and run.sla_met("offline").sum() == 11
    assert t.loc[t["number"] == 13, "duplicate_of"].item() == 2
    server = next(s for s in run.scenarios if s.name == "server")
    assert (server.ttft_limit_ms, server.tpot_limit_ms, server.qps) == (2000.0, 100.0, 8.0)
    assert [o.column for o in run.objectives] == ["offline.output_tokens_per_s_per_gpu", "server.tpot_p99_ms"]


def test_load_run_tolerates_a_run_in_progress(tmp_path):
    (tmp_path / "trials" / "0000").mkdir(parents=True)
    (tmp_path / "trials" / "0001").mkdir()
    (tmp_path / "trials" / "0001" / "trial.json").write_text("[1, 2]")
    t2 = tmp_path / "trials" / "0002"
    t2.mkdir()
    (t2 / "trial.json").write_text(json.dumps({
        "state": "complete", "params": {"tensor_parallel": 1, "speculative": {"method": "ngram", "tokens": 4}},
        "scenarios": {"offline": {"scenario": "offline", "valid": True,
                                  "summary": {"output_tokens_per_s": 10.0, "tpot_p99_ms": 5.0}}}}))
    run = load_run(tmp_path)  # no study.yaml, a folder without trial.json, a file that is no object
    assert run.skipped == 2 and run.spec == {} and run.name == tmp_path.name
    assert run.trials["number"].tolist() == [2]  # the number comes from the folder when the file lacks it
    assert run.trials["param.speculative.method"].item() == "ngram"
    assert run.trials["offline.valid"].item() is True
    assert run.trials["offline.sla_met"].item() is True  # no limits given: nothing to miss
    assert [s.name for s in run.scenarios] == ["offline"]
    html = write_report(tmp_path).read_text()
    assert "not enough trials" in html

    empty = load_run(tmp_path / "nowhere")
    assert empty.trials.empty and empty.skipped == 0
    assert "No trial has been written yet" in write_report(tmp_path / "nowhere", tmp_path / "e.html").read_text()


# -- the HTML report ------------------------------------------------------------------------------------------

def _figures(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="st-figures">(.*?)</script>', html, re.S)
    assert m, "figure JSON block missing"
    return json.loads(m.group(1))


def test_report_is_self_contained(report):
    assert report.count("plotly.js v") >= 1 and len(report) > 3_000_000  # the bundle itself, inlined
    assert not re.search(r"<script[^>]*\bsrc\s*=", report, re.I), "no external scripts"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']https?:", report, re.I), "no external styles"
    assert report.count("Copyright 2012-") == 1  # inlined once, not per figure
    assert report.rstrip().endswith("</html>")


def test_report_content(report):
    for n in range(EXPECTED["trials"]):
        assert f'id="trial-{n}"' in report
    assert OOM_REASON in report and REJECT_REASON in report
    assert SLA_REASON.replace(">", "&gt;") in report and SHORT_RUN_REASON in report
    assert "same config as trial #2" in report and "runs not valid" in report
    assert "★ baseline" in report and "fixture-study" in report and "2 × H100" in report
    assert "1.65× baseline" in report  # best offline tok/s/GPU 4300 vs the baseline's 2600
    assert "torch.OutOfMemoryError" in report  # the failed trial's engine.log tail
    assert "PED-ANOVA" in report  # importance computed from study.db


def test_report_escapes_user_strings(report):
    assert HOSTILE not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report  # the table shows it, as text
    figs = json.dumps(_figures(report))
    assert HOSTILE not in figs  # hover text is HTML-escaped before Plotly renders it


def test_report_pareto_traces(report):
    figs = _figures(report)
    fig = next(f for f in figs.values()
               if f["layout"].get("title", {}).get("text") == "server: output tokens/s/GPU vs p99 TPOT")
    traces = {t["name"]: t for t in fig["data"]}
    assert len(traces[FRONT]["x"]) == len(EXPECTED["server_tpot_per_gpu_front"])
    # customdata: [hover text, trial number]; the page opens the drill-down of the number
    assert [int(re.search(r"#(\d+)", h).group(1)) for h, _ in traces[FRONT]["customdata"]] == \
        EXPECTED["server_tpot_per_gpu_front"]
    assert [n for _, n in traces[FRONT]["customdata"]] == EXPECTED["server_tpot_per_gpu_front"]
    assert traces[FRONT]["x"] == sorted(traces[FRONT]["x"])
    assert traces[INVALID]["x"] == [21.0]  # trial 11: best TPOT of all, but it missed the TTFT limit
    assert traces[INVALID]["marker"]["symbol"] != traces[FRONT]["marker"].get("symbol")
    assert traces[BASELINE]["marker"]["symbol"] == "star" and traces[BASELINE]["text"] == ["baseline"]
    assert "tensor_parallel = 1" in traces[BASELINE]["customdata"][0][0]
    assert "p99 TPOT: 38 ms" in traces[BASELINE]["customdata"][0][0]
    assert any(s.get("x0") == 100.0 for s in fig["layout"]["shapes"])  # the TPOT SLA line
    assert "importance-chart" in figs


def test_chart_front_numbers(run_dir):
    run = load_run(run_dir)
    server = next(s for s in run.scenarios if s.name == "server")
    chart = pareto_chart(run, server, ChartSpec("tpot_p99_ms", "output_tokens_per_s_per_gpu", "minimize", "maximize"),
                         "c")
    assert chart.front_numbers == EXPECTED["server_tpot_per_gpu_front"]
    offline = next(s for s in run.scenarios if s.name == "offline")
    both_max = pareto_chart(run, offline, ChartSpec("tokens_per_s_per_user", "output_tokens_per_s_per_gpu",
                                                    "maximize", "maximize"), "d")
    # offline has no SLA, so trial 11 (slowest but best per user) competes and wins its corner
    assert both_max.front_numbers[-1] == 11
    assert not any(s.get("type") == "line" for s in both_max.figure["layout"].get("shapes", []))


def test_report_without_study_db(tmp_path):
    html = write_report(write_run(tmp_path, with_db=False)).read_text()
    assert "no study.db" in html and "importance-chart" not in html
    assert "Pareto front" in html  # the charts need only the trial files


def test_headline_and_objective_front(run_dir):
    run = load_run(run_dir)
    front_numbers, label = objective_front(run)
    assert front_numbers == EXPECTED["objective_front"] and label == "Pareto-optimal"
    h = headlines(run)[0]
    assert (h.best_trial, h.best, h.baseline, h.ratio) == (6, "4,300 tok/s/GPU", "2,600 tok/s/GPU", "1.65× baseline")


def test_units():
    assert fmt_number(1015.4) == "1,015" and fmt_number(24.31) == "24.3" and fmt_number(0.853) == "0.85"
    assert fmt_metric(80.2, "ttft_p99_ms") == "80.2 ms" and fmt_metric(0.0123, "error_rate") == "1.2%"
    assert fmt_metric(float("nan"), "tpot_p99_ms") == "—"


def test_report_states_the_study_gpu_use(run_dir, report):
    """The header's GPU use is the one the driver writes to summary.json, from the same trial records."""
    records = []
    for p in sorted((run_dir / "trials").glob("*/trial.json")):
        try:
            records.append(json.loads(p.read_text()))
        except ValueError:
            continue  # the fixture's unreadable trial file
    use = gpu_use(records, 2)
    launched = [r for r in records if r.get("gpu_ids") and r.get("duplicate_of") is None and r.get("started_at")]
    assert use["busy_gpu_s"] == pytest.approx(sum((r["wall_s"] or 0) * len(r["gpu_ids"]) for r in launched), abs=0.1)
    assert 0 < use["utilization"] < 1  # the fixture's trials start a minute apart and run 40-55 s
    assert f"GPU use <b>{use['utilization']:.0%}</b>" in report
