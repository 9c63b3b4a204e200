"""After an interrupt: interrupted trials shown as such, no duplicate spends the budget, the re-run baseline
counts, GPU use ignores the time between runs (issue 17.6)."""
from __future__ import annotations

import json

import optuna

from servetune.optimizer.driver import BASELINE, KEY, STALE, StudyDriver, config_key
from servetune.optimizer.records import TrialResult, gpu_use, write_json_atomic
from servetune.optimizer.spec import load_study
from servetune.reports.html import headlines
from servetune.reports.model import load_run
from study_fixtures import write_study


def _driver(tmp_path):
    return StudyDriver(load_study(write_study(tmp_path, trials=4)))


def _running(driver, study, params: dict, baseline: bool = False):
    """A trial as the loop leaves it while it runs: asked, planned, keyed, trial.json 'running'."""
    trial = study.enqueue_trial(params, user_attrs={BASELINE: True} if baseline else {}) or study.ask()
    plan, _ = driver.plan_trial(trial)
    trial.set_user_attr(KEY, config_key(plan.engine, plan.params))
    write_json_atomic(driver.trial_dir(trial.number) / "trial.json",
                      TrialResult(number=trial.number, engine=plan.engine, params=plan.params, state="running",
                                  is_baseline=baseline).to_dict())
    return trial


def test_resume_queues_each_interrupted_config_once_and_none_already_measured(tmp_path):
    driver = _driver(tmp_path)
    driver.run_dir.mkdir(parents=True)
    study = driver.open_study()
    a = {"tensor_parallel": 1, "max_concurrency": 8, "quantization": "none"}
    b = {"tensor_parallel": 1, "max_concurrency": 32, "quantization": "fp8"}
    measured = _running(driver, study, b)  # measured and told: its config is known
    write_json_atomic(driver.trial_dir(measured.number) / "trial.json",
                      TrialResult(number=measured.number, engine="sim", params=b, state="complete").to_dict())
    study.tell(measured, [100.0, 20.0])
    _running(driver, study, a)  # measuring config a when the driver stopped ...
    _running(driver, study, a)  # ... and a trial parked on the same config
    _running(driver, study, b)  # a trial sampled again on the measured config
    assert driver.recover(study, exclusive=True) == 1
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [a]
    assert sum(1 for t in trials if t.user_attrs.get(STALE)) == 3  # not counted against the budget


def test_the_report_shows_interrupted_trials_and_counts_the_re_run_baseline(tmp_path):
    driver = _driver(tmp_path)
    driver.run_dir.mkdir(parents=True)
    study = driver.open_study()
    _running(driver, study, {}, baseline=True)
    assert driver.recover(study, exclusive=True) == 1  # the baseline, queued again ...
    again = study.ask()
    plan, _ = driver.plan_trial(again)
    summary = {"output_tokens_per_s_per_gpu": 900.0, "output_tokens_per_s": 900.0, "tpot_p99_ms": 9.0,
               "ttft_p99_ms": 80.0}
    write_json_atomic(driver.trial_dir(again.number) / "trial.json", TrialResult(  # ... and measured
        number=again.number, engine="sim", params=plan.params, state="complete", is_baseline=True,
        scenarios={"server": {"summary": summary, "sla_met": True}}).to_dict())
    # a trial left 'running' by a driver that is gone (no session alive)
    write_json_atomic(driver.trial_dir(7) / "trial.json",
                      TrialResult(number=7, engine="sim", params={}, state="running").to_dict())
    (driver.run_dir / "study.yaml").write_text(open(driver.spec.source).read())
    run = load_run(driver.run_dir)
    states = dict(zip(run.trials["number"], run.trials["state"]))
    assert states == {0: "interrupted", 1: "complete", 7: "interrupted"}
    assert run.state_counts()["interrupted"] == 2 and run.state_counts()["running"] == 0
    assert int(run.baseline()["number"]) == 1
    h = headlines(run)[0]
    assert h.baseline and "no value" not in (h.note or ""), h


def test_gpu_use_counts_only_the_time_a_driver_ran():
    trials = [{"number": 0, "gpu_ids": [0], "started_at": "2026-11-22T10:00:00+00:00", "wall_s": 100},
              {"number": 1, "gpu_ids": [0], "started_at": "2026-11-22T14:00:00+00:00", "wall_s": 100}]
    sessions = [{"started": "2026-11-22T09:59:50+00:00", "ended": "2026-11-22T10:01:50+00:00"},
                {"started": "2026-11-22T13:59:50+00:00", "ended": None}]  # killed: ends with its last trial
    assert gpu_use(trials, 1)["utilization"] < 0.02  # the four hours between the runs counted
    use = gpu_use(trials, 1, sessions)
    assert use["available_gpu_s"] == 220.0 and use["utilization"] > 0.9, use  # 2 × (10 s of start-up + 100 s)


def test_a_measurement_the_dead_driver_never_told_is_told_to_its_own_trial(tmp_path):
    driver = _driver(tmp_path)
    driver.run_dir.mkdir(parents=True)
    study = driver.open_study()
    measured = _running(driver, study, {"tensor_parallel": 1, "max_concurrency": 8, "quantization": "none"})
    summary = {"output_tokens_per_s_per_gpu": 900.0, "output_tokens_per_s": 900.0, "tpot_p99_ms": 9.0,
               "ttft_p99_ms": 80.0}
    write_json_atomic(driver.trial_dir(measured.number) / "trial.json", TrialResult(  # the worker finished it
        number=measured.number, engine="sim", params=measured.params, state="complete",
        scenarios={"server": {"summary": summary}}).to_dict())
    assert driver.recover(study, exclusive=True) == 0  # nothing queued again: it was measured
    t = study.get_trials(deepcopy=False)[measured.number]
    assert t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get(STALE)
    assert t.values == [900.0, 9.0]
    assert json.loads((driver.trial_dir(measured.number) / "trial.json").read_text())["state"] == "complete"
