"""The level audit in the report: contaminated scenarios on the charts and in the table, the audit and the
warm-up in a trial's drill-down."""
from __future__ import annotations

import json

from report_fixtures import write_run
from servetune.reports import load_run
from servetune.reports.charts import CONTAMINATED, INVALID, chart_specs, pareto_chart
from servetune.reports.details import trial_detail
from servetune.reports.html import TableColumn, _cell


def _audit(passed: bool, hits: float, **kw) -> dict:
    return {"window": "level", "passed": passed, "reasons": [] if passed else [
        f"prefix-cache hits were {hits / 61440:.1%} of the prompt tokens"], "notes": [],
        "server": {"prompt_tokens": 61440.0, "generation_tokens": 15360.0, "prefix_cache_hits": hits,
                   "preemptions": 0.0, "kv_cache_usage_peak": 0.42},
        "client": {"prompt_tokens": 61440.0, "generation_tokens": 15360.0},
        "log": {"counts": {"jit": 1}, "events": []}, **kw}


def test_a_contaminated_trial_is_flagged_not_missed_and_its_audit_is_in_the_drill_down(tmp_path):
    run_dir = write_run(tmp_path / "run")
    path = run_dir / "trials" / "0011" / "trial.json"  # misses the server TTFT limit in the fixture
    t = json.loads(path.read_text())
    sc = t["scenarios"]["server"]
    first = _audit(False, 7800.0)
    sc.update(contaminated=True, sla_met=None, contaminated_levels=[8.0],
              invalid_reasons=sc["invalid_reasons"] + ["audit: prefix-cache hits were 12.7% of the prompt tokens"],
              audit=_audit(False, 7800.0, contaminated=True, rerun_of={"audit": first, "valid": False}))
    t["warmup"] = {"max_concurrency": 64, "requests": 127, "seconds": 31.5, "compile_lines": 3, "clean": True,
                   "stopped_because": "round 2 compiled nothing",
                   "rounds": [{"round": 1, "seconds": 20.1, "requests": 127, "compile_lines": 3,
                               "lines": ["(EngineCore_DP0 pid=1234) WARNING ... fused_moe_kernel ..."]},
                              {"round": 2, "seconds": 11.4, "requests": 127, "compile_lines": 0, "lines": []}]}
    path.write_text(json.dumps(t))
    run = load_run(run_dir)
    row = run.trials[run.trials["number"].eq(11)].iloc[0]
    assert row["server.contaminated"] is True and row["server.sla_met"] is None
    assert row["server.contaminated_levels"] == "8"
    sc_server = next(s for s in run.scenarios if s.name == "server")
    fig = pareto_chart(run, sc_server, chart_specs()[0], "c").figure
    by_name = {tr["name"]: [c[1] for c in tr["customdata"]] for tr in fig["data"]}
    assert by_name[CONTAMINATED] == [11] and 11 not in by_name.get(INVALID, [])
    hover = next(tr for tr in fig["data"] if tr["name"] == CONTAMINATED)["customdata"][0][0]
    assert "<b>contaminated</b>, no verdict" in hover and "levels contaminated after a re-run" in hover
    d = trial_detail(run, 11)
    server = next(s for s in d["scenarios"] if s["name"] == "server")
    assert server["verdict"]["sla"] == "contaminated"
    rows = server["audit"]["rows"]
    assert [r[1] for r in rows] == ["failed: re-run after more warm-up", "contaminated"]
    assert rows[1][2] == "61,440 / 61,440" and rows[1][4] == "12.7%" and rows[1][5] == "42%" and rows[1][7] == "1 jit"
    assert server["audit"]["flags"] == ["replaced", "contaminated"]
    assert d["warmup"]["text"].startswith("2 rounds of a concurrency ramp up to 64, 127 requests in 31.5 s")
    assert d["warmup"]["rows"][0][3] == "3"
    cell = _cell(row, TableColumn("server", "SLA", "server.sla_met"))
    assert cell["text"] == "contaminated" and "contaminated: " in cell["title"]
