"""Real studies: Ray packing of 1/2/4-GPU trials, failed configs never relaunched, resume after a dead driver
with trials in flight, pre-screening with calibration, repeats. Real Ray, real Optuna SQLite, sim servers."""
from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path

import optuna
import pytest

from servetune.optimizer.driver import STALE, StudyDriver
from servetune.optimizer.records import TrialResult, gpu_use, write_json_atomic
from servetune.optimizer.spec import load_study
from servetune.optimizer.trial_executor import TrialExecutor
from study_fixtures import write_study

pytestmark = pytest.mark.slow


def _trials(run: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sorted((run / "trials").glob("*/trial.json"))}


def _run(path: Path, sampler: str | None = None) -> tuple[StudyDriver, list[tuple[str, dict]]]:
    if sampler:
        path.write_text(path.read_text().replace("sampler: {kind: tpe, seed: 3}", f"sampler: {sampler}"))
    events: list[tuple[str, dict]] = []
    d = StudyDriver(load_study(path), on_event=lambda k, data: events.append((k, data)))
    d.run()
    return d, events


def test_trials_of_1_2_4_gpus_pack_on_4_gpus_without_sharing(tmp_path):
    study = write_study(tmp_path, trials=7, parallel=4, duration_s=3, qps=3, gpus=4, search="""
      tensor_parallel: [1, 2, 4]
      max_concurrency: [8, 16, 32, 64]
    """, extra="baseline: false\n")
    _, events = _run(study, sampler="{kind: random, seed: 5}")
    trials = [t for t in _trials(tmp_path / "run").values() if t.get("duplicate_of") is None and t["gpu_ids"]]
    assert {t["gpus"] for t in trials} >= {1, 2}, [t["params"] for t in trials]
    spans = []
    for t in trials:
        assert len(t["gpu_ids"]) == t["gpus"] == t["params"]["tensor_parallel"]
        assert set(t["gpu_ids"]) <= {0, 1, 2, 3}
        start = dt.datetime.fromisoformat(t["started_at"]).timestamp()  # milliseconds (whole seconds before)
        spans.append((start, start + t["wall_s"], set(t["gpu_ids"]), t["number"]))
    concurrent = 0
    for (s1, e1, g1, n1), (s2, e2, g2, n2) in itertools.combinations(spans, 2):
        overlap = min(e1, e2) - max(s1, s2)
        if overlap > 1.5:  # beyond the 1 s resolution of started_at: they really ran together
            concurrent += 1
            assert not g1 & g2, f"trials {n1} and {n2} ran at once on GPUs {g1 & g2}"
    assert concurrent >= 1, "no two trials ran at once: packing was not exercised"
    # GPU use of the study: the GPU-seconds the launched trials held, over 4 GPUs × the span they covered
    use = json.loads((tmp_path / "run" / "summary.json").read_text())["gpu_use"]
    held = sum(t["wall_s"] * len(t["gpu_ids"]) for t in trials)
    assert use["busy_gpu_s"] == pytest.approx(held, abs=0.5)
    assert 0 < use["utilization"] <= 1.0 and use["available_gpu_s"] >= held
    assert use["shared"] == [] and 2 <= use["peak_gpus"] <= 4


def test_gpu_use_names_trials_that_held_one_gpu_at_once():
    # what the packing check reports when two launches overlapped on a GPU (here: made up to overlap on 1)
    records = [
        {"number": 0, "gpu_ids": [0, 1], "started_at": "2026-11-22T10:00:00.000+00:00", "wall_s": 100.0},
        {"number": 1, "gpu_ids": [1, 2], "started_at": "2026-11-22T10:01:00.000+00:00", "wall_s": 100.0},
        {"number": 2, "gpu_ids": [3], "started_at": "2026-11-22T10:00:30.000+00:00", "wall_s": 10.0},
        {"number": 3, "gpu_ids": [1], "started_at": "2026-11-22T10:03:00.000+00:00", "wall_s": 10.0},
    ]
    use = gpu_use(records, 4)
    assert use["shared"] == [[0, 1, ["1"]]]  # trial 3 starts on GPU 1 after trial 1 released it
    assert use["peak_gpus"] == 4  # from 10:01:00, trials 0 and 1 (trial 2 ended at 10:00:40)
    assert use["busy_gpu_s"] == 200 + 200 + 10 + 10


def test_a_failed_config_is_never_relaunched(tmp_path):
    # memory_fraction 0.05: the engine cannot fit its KV cache and exits at start (an OOM-kind failure)
    study = write_study(tmp_path, trials=5, parallel=1, search="""
      memory_fraction: [0.05, 0.9]
      max_concurrency: [8]
    """, extra="baseline: false\n")
    d, events = _run(study, sampler="{kind: random, seed: 0}")
    launches = [e for k, e in events if k == "launch"]
    keys = [json.dumps(sorted(e["params"].items())) for e in launches]
    assert len(keys) == len(set(keys)) <= 2  # each distinct config launched once, the rest reused
    trials = _trials(tmp_path / "run")
    failed = [t for t in trials.values() if t["state"] == "failed"]
    assert failed and any(t.get("duplicate_of") is not None for t in failed)
    st = optuna.load_study(study_name="itest", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    failed_numbers = {t["number"] for t in failed}
    assert not failed_numbers & {t.number for t in st.best_trials}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert not failed_numbers & set(summary["pareto"])


def test_a_config_sampled_while_it_is_measured_waits_for_that_result(tmp_path):
    # one configuration, two GPUs, three trials: the first takes a GPU, the others wait for its result
    study = write_study(tmp_path, trials=3, parallel=2, duration_s=3, qps=3, search="""
      max_concurrency: [16]
    """, extra="baseline: false\n")
    _, events = _run(study)
    assert len([e for k, e in events if k == "launch"]) == 1
    assert sum("will take that result" in e.get("text", "") for k, e in events if k == "note") == 2
    trials = _trials(tmp_path / "run")
    assert [t.get("duplicate_of") for _, t in sorted(trials.items())] == [None, 0, 0]
    assert all(t["state"] == "complete" and t["objectives"] for t in trials.values())
    st = optuna.load_study(study_name="itest", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [t.state for t in st.trials] == [optuna.trial.TrialState.COMPLETE] * 3


class _InstantExecutor(TrialExecutor):
    """Stands in for Ray where only the driver's loop is under test: every trial completes at once."""

    def __init__(self):
        self.done = {}

    def submit(self, plan):
        c = plan.params.get("max_concurrency", 8)
        self.done[id(plan)] = TrialResult(number=plan.number, engine=plan.engine, params=plan.params,
                                          state="complete", gpus=plan.gpus, scenarios={"server": {"summary": {
                                              "output_tokens_per_s": 100.0 * c, "tpot_p99_ms": 10.0 + c,
                                              "ttft_p99_ms": 100.0}}})
        return id(plan)

    def wait(self, refs, timeout_s):
        return list(refs)

    def result(self, ref):
        return self.done.pop(ref)

    def cancel(self, ref, force=True):
        pass

    def shutdown(self):
        pass


def test_grid_study_stops_when_every_point_was_visited(tmp_path, monkeypatch):
    study = write_study(tmp_path, trials=6, parallel=2, search="""
      max_concurrency: [8, 16]
    """, extra="baseline: false\n")
    monkeypatch.setattr(StudyDriver, "_executor", lambda self: _InstantExecutor())
    d, events = _run(study, sampler="{kind: grid, seed: 0}")
    launched = sorted(e["params"]["max_concurrency"] for k, e in events if k == "launch")
    assert launched == [8, 16]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_because"] == "every grid point was visited"


def test_resume_after_a_dead_parallel_driver_requeues_its_in_flight_trials(tmp_path):
    """A driver running 2 trials at once dies: both are RUNNING in storage with trial.json 'running'. The
    next run marks them stale, runs their configs again and finishes the budget."""
    study = write_study(tmp_path, trials=4, parallel=2, duration_s=2, extra="baseline: false\n")
    spec = load_study(study)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    dead = StudyDriver(spec)
    st = dead.open_study()
    lost = []
    for _ in range(2):
        trial = st.ask()
        plan, _ = dead.plan_trial(trial)
        write_json_atomic(Path(plan.trial_dir) / "trial.json", TrialResult(
            number=plan.number, engine=plan.engine, params=plan.params, state="running", gpus=plan.gpus).to_dict())
        lost.append(plan.params)
    d, events = _run(study)
    assert ("resumed", {"requeued": 2}) in events
    st = optuna.load_study(study_name="itest", storage=spec.storage_url)
    stale = [t for t in st.trials if t.user_attrs.get(STALE)]
    counted = [t for t in st.trials if not t.user_attrs.get(STALE)]
    assert len(stale) == 2 and all(t.state == optuna.trial.TrialState.FAIL for t in stale)
    assert len(counted) == 4 and all(t.state.is_finished() for t in counted)
    rerun = [t.user_attrs.get("servetune.params") for t in counted]
    for p in lost:
        assert p in rerun  # the lost configs ran again
    assert sum(1 for t in counted if t.state == optuna.trial.TrialState.COMPLETE) >= 3


def test_prescreen_calibrates_and_repeats_measure_noise(tmp_path):
    study = write_study(tmp_path, trials=4, parallel=2, duration_s=2, qps=4, search="""
      max_concurrency: [4, 8, 16, 32, 64]
      quantization: [none, fp8]
    """, extra="fidelity: {prescreen: 6, max_requests: 40}\n"
             "budget: {trials: 4, parallel: 2, repeats: 1, repeat_top: 1}\n")
    study.write_text(study.read_text().replace("budget: {trials: 4, parallel: 2}\n", ""))
    d, events = _run(study)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    cal = summary["fidelity"]["calibration"]
    assert cal["pairs"] >= 3 and "output_tokens_per_s" in cal["error_before"]
    assert "output_tokens_per_s" in cal["error_after"]
    # the sim and its estimator share one scheduler: after calibration they agree closely
    assert cal["error_after"]["output_tokens_per_s"] < 0.25
    screened = sorted(run.glob("trials/*/estimate.json"))
    assert screened, "no trial was launched through the pre-screen"
    est = json.loads(screened[-1].read_text())
    assert est["chosen"]["candidates"] == 6 and len(est["candidates"]) == 6
    if _trials(run)[int(screened[-1].parent.name)]["state"] == "complete":
        assert est["error_raw"] and est["error_calibrated"]
    # repeats: the top Pareto trial measured once more, mean ± CI in the summary
    noise = summary["noise"]
    assert noise["repeats"] == 1 and len(noise["trials"]) == 1
    (number, stats), = noise["trials"].items()
    assert (run / "trials" / f"{int(number):04d}" / "repeat_1" / "trial.json").exists()
    first = stats["server.output_tokens_per_s_per_gpu"]
    assert first["n"] == 2 and first["ci"] is not None
    assert set(noise["pareto_noise_aware"]) >= set()  # computed (may be any subset of the measured trials)
    assert [k for k, _ in events].count("repeat") == 1


def test_concurrency_sweep_within_one_launch(tmp_path):
    """kind: concurrency with a list: one launch measures each level (closed loop) and keeps the curve."""
    study = write_study(tmp_path, trials=1, parallel=1, search="""
      max_concurrency: [64]
    """, extra="baseline: false\n")
    text = study.read_text().replace(
        "- {kind: server, qps: 4, duration_s: 3, sla: {ttft_p99_ms: 2000, tpot_p99_ms: 100}}",
        "- {kind: concurrency, concurrency: [1, 4, 16], num_requests: 24, sla: {ttft_p99_ms: 5000, tpot_p99_ms: 500}}")
    study.write_text(text.replace("scenario: server", "scenario: concurrency"))
    _run(study)
    t = _trials(tmp_path / "run")[0]
    assert t["state"] == "complete", t.get("failure")
    sc = t["scenarios"]["concurrency"]
    assert [lvl["concurrency"] for lvl in sc["levels"]] == [1, 4, 16]
    assert sc["summary"]["max_valid_concurrency"] == 16
    tps = [lvl["summary"]["output_tokens_per_s"] for lvl in sc["levels"]]
    assert tps[0] < tps[-1]  # more outstanding requests, more throughput on one GPU
    assert (tmp_path / "run" / "trials" / "0000" / "requests_concurrency_c4.csv").exists()


def test_a_trial_still_queued_at_the_wall_time_is_withdrawn_and_runs_on_resume(tmp_path):
    # two trials in flight that each need all 4 GPUs (the Ray instance of other tests declares 4 too): the
    # second waits in Ray's queue; when the wall time comes it must not start an engine after it (on a GPU
    # host it launched 11 minutes late), and a resumed study measures it
    study = write_study(tmp_path, trials=2, parallel=2, duration_s=3, qps=3, gpus=4, sampler="{kind: grid}", search="""
      tensor_parallel: [4]
      max_concurrency: [8, 64]
    """, extra="baseline: false\n")
    study.write_text(study.read_text().replace("budget: {trials: 2, parallel: 2}",
                                               "budget: {trials: 2, parallel: 2, wall_time_s: 2}"))
    _, events = _run(study)
    assert [e["queued"] for k, e in events if k == "launch"] == [False, True]
    assert any(k == "note" and "had not started by the wall time" in e["text"] for k, e in events), events
    trials = _trials(tmp_path / "run")
    ran = [t for t in trials.values() if t.get("started_at")]
    withdrawn = [t for t in trials.values() if not t.get("started_at")]
    assert len(ran) == 1 and ran[0]["state"] == "complete"
    assert len(withdrawn) == 1 and withdrawn[0]["stale"] and "wall time" in withdrawn[0]["failure"]["reason"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_because"] == "wall time reached"
    # resumed without the wall time: the withdrawn config is measured, the budget of 2 is met
    study.write_text(study.read_text().replace(", wall_time_s: 2}", "}"))
    _run(study)
    done = [t for t in _trials(tmp_path / "run").values() if t["state"] == "complete"]
    assert sorted(t["params"]["max_concurrency"] for t in done) == [8, 64]


def test_rejected_configurations_do_not_spend_the_trial_budget(tmp_path):
    # one GPU: tensor_parallel 2 and 4 are rejected before launch (no GPU time); the budget of 3 trials is
    # 3 measured ones, however many rejections the sampler drew on the way
    study = write_study(tmp_path, trials=3, parallel=1, duration_s=1, qps=2, gpus=1, sampler="{kind: random, seed: 0}",
                        search="""
      tensor_parallel: [1, 2, 4]
      max_concurrency: [8, 16, 32, 64]
    """, extra="baseline: false\n")
    _run(study)
    trials = _trials(tmp_path / "run")
    rejected = [t for t in trials.values() if t["state"] == "rejected"]
    measured = [t for t in trials.values() if t["state"] != "rejected"]
    assert rejected and all(t["params"]["tensor_parallel"] > 1 for t in rejected)
    assert len(measured) == 3 and all(t["state"] == "complete" for t in measured)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_because"] == "trial budget reached"
    # a space the rules reject entirely ends after 10 rejections per trial of the budget, not never
    study.write_text(study.read_text().replace("tensor_parallel: [1, 2, 4]", "tensor_parallel: [3, 5]")
                     .replace("gpus: 1}", "gpus: 8}")  # neither divides the model's 32 heads
                     .replace(f"output_dir: {tmp_path / 'run'}", f"output_dir: {tmp_path / 'run2'}"))
    _run(study)
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["stopped_because"] == "the sampler drew 30 configurations the rules reject"
