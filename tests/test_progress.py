"""Live progress: the trial writes progress.json, the driver polls it; plain lines when not a terminal (17.4)."""
from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import optuna
from rich.console import Console

from servetune.loadgen import progress as loadgen_progress
from servetune.loadgen.scenarios import ScenarioSettings
from servetune.optimizer import cli
from servetune.optimizer.driver import scenario_plans
from servetune.optimizer.progress import RunProgress, TrialProgress
from servetune.optimizer.records import TrialResult
from servetune.optimizer.spec import load_study
from study_fixtures import write_study
from test_resume_check import _measured_run


def test_a_run_prints_each_trials_phases_and_the_best_so_far_when_not_a_terminal(tmp_path, capsys):
    # a study measured before in this directory: --new starts itest-2 beside it, leaving it as it was
    path, old = _measured_run(tmp_path, trials=1, parallel=1, qps="[4, 8]", duration_s=2,
                              search="max_concurrency: [32]", extra="baseline: false\n")
    assert cli.main(["run", str(path), "--new", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert f"a new study itest-2 in {tmp_path / 'run'}-2 ({tmp_path / 'run'} is kept as it is)" in out
    assert len(optuna.load_study(study_name="itest", storage=old.storage_url).trials) == 1
    lines = [ln.strip() for ln in out.splitlines()]
    # the driver polls about once a second: the engine's start (seconds) is always seen, a 2 s level nearly
    started = [ln for ln in lines if ln.startswith("#0   started;")]
    assert len(started) == 1 and ("launching the engine" in started[0] or "server: level" in started[0]), out
    levels = [ln for ln in lines if re.fullmatch(r"#0\s+(started; )?server: level [12] of ≤2 at [48] req/s "
                                                 r"\(trial at \d+:\d\d, at most \d+:\d\d left\)", ln)]
    assert levels, out
    (summary,) = [ln for ln in lines if ln.startswith("trials: ")]
    assert re.fullmatch(r"trials: 0 running, 0 queued for GPUs, 1 of 1 done; best so far: #0 "
                        r"server\.output_tokens_per_s_per_gpu = [\d,.]+", summary), summary
    # the progress file the trial wrote, and only the trial
    assert (tmp_path / "run-2" / "trials" / "0000" / "progress.json").is_file()


def test_the_terminal_table_shows_phase_elapsed_left_queued_and_best(tmp_path):
    spec = load_study(write_study(tmp_path, qps="[4, 8]", duration_s=30))
    out = io.StringIO()
    live = RunProgress(Console(file=out, force_terminal=True, width=160), spec, lambda p: f"conc={p['conc']}")
    running, queued = tmp_path / "t0", tmp_path / "t1"
    trial = TrialProgress(running, scenario_plans(spec))  # what run_trial writes
    try:
        plans = [SimpleNamespace(number=0, trial_dir=str(running), params={"conc": 8}),
                 SimpleNamespace(number=1, trial_dir=str(queued), params={"conc": 32})]
        live.event("start", {"done": 0, "budget": 6, "run_dir": str(tmp_path)})
        live.event("tick", {"in_flight": plans})
        trial.scenario(scenario_plans(spec)[0])
        loadgen_progress.emit("level_start", settings=ScenarioSettings(kind="server", qps=8, duration_s=30,
                                                                       warmup_requests=4), dataset_size=40)
        text = _render(live._table())
        assert "1 running, 1 queued for GPUs, 0 of 6 done; best so far: none yet" in text
        assert "server: warm-up (4 requests), then level 1 of ≤2" in text and "conc=8" in text
        loadgen_progress.emit("measuring")
        text = _render(live._table())
        assert "server: level 1 of ≤2 at 8 req/s" in text and re.search(r"≤\d:\d\d", text)  # the time left
        done = TrialResult(number=0, engine="sim", params={}, state="complete", scenarios={
            "server": {"summary": {"output_tokens_per_s_per_gpu": 1234.5}, "sla_met": True}})
        live.event("result", {"result": done, "constraints": []})
        assert "best so far: #0 server.output_tokens_per_s_per_gpu = 1,234" in _render(live._table())
        # faster, but outside the quality limits (as fp8 on the real SmolLM2, 2026-12-05): not a best to act on
        lossy = TrialResult(number=1, engine="sim", params={}, state="complete", scenarios={
            "server": {"summary": {"output_tokens_per_s_per_gpu": 1300.0}, "sla_met": True}},
            quality={"passed": False, "reasons": ["exact match 11% < 60%"]})
        live.event("result", {"result": lossy, "constraints": []})
        assert "best so far: #0 server.output_tokens_per_s_per_gpu = 1,234" in _render(live._table())
    finally:
        trial.close()
        live.stop()


def test_the_engine_warm_up_shows_its_rounds_and_what_each_compiled(tmp_path):
    # a cold MoE engine spends minutes in the launch warm-up (105 s on the H200, 2026-12-04): the display names
    # the round and what the earlier ones compiled instead of "launching the engine"
    spec = load_study(write_study(tmp_path, qps="[4, 8]", duration_s=30))
    out = io.StringIO()
    plain = RunProgress(Console(file=out, force_terminal=False, width=200), spec, lambda p: "")
    trial = TrialProgress(tmp_path / "t0", scenario_plans(spec))
    plans = [SimpleNamespace(number=0, trial_dir=str(tmp_path / "t0"), params={})]
    try:
        plain.event("tick", {"in_flight": plans})
        why = "before the first measured level"
        loadgen_progress.emit("launch_warmup", why=why, round=1, top=512, ends_by=time.time() + 300,
                              compiles=[])
        plain.event("tick", {"in_flight": plans})
        plain.event("tick", {"in_flight": plans})  # the same round: no second line
        loadgen_progress.emit("launch_warmup", why=why, round=2, top=512, ends_by=time.time() + 250,
                              compiles=[8])
        plain.event("tick", {"in_flight": plans})
        loadgen_progress.emit("launch_warmup_done", why=why, rounds=2, seconds=105.2,
                              stopped_because="round 2 compiled nothing")
        plain.event("tick", {"in_flight": plans})
    finally:
        trial.close()
    lines = [ln.strip() for ln in out.getvalue().splitlines()]
    assert lines[0].startswith("#0   started; launching the engine"), lines
    assert re.fullmatch(r"#0\s+engine warm-up round 1 before the first measured level \(a ramp to 512 in flight\) "
                        r"\(trial at \d:\d\d, at most [45]:\d\d left\)", lines[1]), lines
    assert lines[2].startswith("#0   engine warm-up round 2 before the first measured level (a ramp to 512 in "
                               "flight; round 1: 8 compile lines)"), lines
    assert lines[3].startswith("#0   engine warm-up done in 1:45, 2 round(s): round 2 compiled nothing"), lines
    assert len(lines) == 4


def _render(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False).print(renderable)
    return buf.getvalue()
