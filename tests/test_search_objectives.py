"""Objectives, constraints, samplers over conditional spaces, failure learning, cost, calibration, noise.

In-process (no Ray, no engines): a real StudyDriver on a real Optuna SQLite study, with results told as the
loop would tell them. The estimator stands in for measurements where a landscape is needed.
"""
from __future__ import annotations

import importlib.util
import math
import random

import optuna
import pytest

from servetune.optimizer import fidelity, noise
from servetune.optimizer.driver import PESSIMISTIC, StudyDriver
from servetune.optimizer.records import ScenarioPlan, TrialResult
from servetune.optimizer.spec import SpecError, load_study
from servetune.optimizer.summary import pareto_numbers
from study_fixtures import write_study


def _driver(tmp_path, sampler: str | None = None, **kw) -> StudyDriver:
    path = write_study(tmp_path, **kw)
    if sampler:
        path.write_text(path.read_text().replace("sampler: {kind: tpe, seed: 3}", f"sampler: {sampler}"))
    spec = load_study(path)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    return StudyDriver(spec)


def _result(plan, state="complete", tps=1000.0, tpot=50.0, ttft=300.0, failure=None) -> TrialResult:
    scen = {} if state != "complete" else {"server": {"summary": {
        "output_tokens_per_s": tps, "tpot_p99_ms": tpot, "ttft_p99_ms": ttft}}}
    return TrialResult(number=plan.number, engine=plan.engine, params=plan.params, state=state, gpus=plan.gpus,
                       scenarios=scen, failure=failure)


def _ask_tell(d: StudyDriver, study, **kw) -> tuple[optuna.Trial, TrialResult]:
    trial = study.ask()
    plan, _ = d.plan_trial(trial)
    r = _result(plan, **kw)
    d.tell(trial, r)
    return trial, r


def test_sla_constraints_reach_optuna_and_keep_infeasible_off_the_front(tmp_path):
    d = _driver(tmp_path, extra="baseline: false\n")
    study = d.open_study()
    _ask_tell(d, study, tps=2000, tpot=40)  # feasible
    _ask_tell(d, study, tps=9000, tpot=150)  # best throughput but breaks p99 TPOT 100 ms
    _ask_tell(d, study, tps=500, tpot=20)  # feasible, faster tokens
    ts = study.trials
    assert set(ts[0].constraints) == {"server.ttft_p99", "server.tpot_p99", "server.steady", "failed"}
    assert ts[1].constraints["server.tpot_p99"] == pytest.approx(0.5)
    assert all(v <= 0 for v in ts[0].constraints.values())
    assert sorted(t.number for t in study.best_trials) == [0, 2]
    # the sampler is built without the deprecated constraints_func
    assert getattr(study.sampler, "_constraints_func", None) is None


def test_failures_are_infeasible_with_pessimistic_values_and_never_on_the_front(tmp_path):
    d = _driver(tmp_path, extra="baseline: false\n")
    study = d.open_study()
    _ask_tell(d, study, tps=2000, tpot=40)
    _ask_tell(d, study, tps=800, tpot=30)
    t_oom, _ = _ask_tell(d, study, state="failed", failure={"kind": "oom", "reason": "CUDA out of memory"})
    t_int, _ = _ask_tell(d, study, state="failed", failure={"kind": "internal", "reason": "Ray worker died"})
    ts = {t.number: t for t in study.trials}
    oom = ts[t_oom.number]
    assert oom.state == optuna.trial.TrialState.COMPLETE and oom.user_attrs[PESSIMISTIC]
    assert oom.values == [800.0, 40.0]  # the worst measured of each objective
    assert oom.constraints["failed"] > 0
    # an internal error says nothing about the config: plain FAIL, the samplers ignore it
    assert ts[t_int.number].state == optuna.trial.TrialState.FAIL
    assert t_oom.number not in [t.number for t in study.best_trials]
    assert t_oom.number not in pareto_numbers(study)


def test_failure_learning_steers_tpe_away_from_a_failing_region(tmp_path):
    """max_concurrency > 128 'OOMs'. Told as infeasible results, TPE samples that region less than when
    failures are plain FAIL trials (which TPE ignores)."""
    space = """
      max_concurrency: [8, 16, 32, 64, 128, 256, 512, 1024]
      max_batched_tokens: [2048, 4096, 8192, 16384]
    """
    counts = {}
    for learn in (True, False):
        sub = tmp_path / str(learn)
        sub.mkdir()
        d = _driver(sub, search=space, extra="baseline: false\n",
                    sampler=f"{{kind: tpe, seed: 1, startup_trials: 8, learn_from_failures: {str(learn).lower()}}}")
        study = d.open_study()
        bad = 0
        for i in range(40):
            trial = study.ask()
            plan, _ = d.plan_trial(trial)
            c = plan.params["max_concurrency"]
            if c > 128:
                r = _result(plan, state="failed", failure={"kind": "oom", "reason": "KV cache"})
                bad += i >= 8
            else:
                r = _result(plan, tps=100.0 * c ** 0.5, tpot=20 + c / 8)
            d.tell(trial, r)
        counts[learn] = bad
    assert counts[True] < counts[False], counts
    assert counts[True] <= 12, counts


@pytest.mark.parametrize("kind", ["tpe", "nsga2", "gp", "random", "grid"])
def test_conditional_space_with_every_sampler(tmp_path, kind):
    if kind == "gp":
        pytest.importorskip("torch", reason="Optuna's GPSampler needs PyTorch")
    space = """
      speculative_method: [none, ngram]
      speculative_tokens: {low: 1, high: 4}
      max_concurrency: [16, 64, 256]
    """
    extra = ", startup_trials: 3" if kind in ("tpe", "gp") else ""
    d = _driver(tmp_path, search=space, extra="baseline: false\n", sampler=f"{{kind: {kind}, seed: 0{extra}}}")
    study = d.open_study()
    seen_on = seen_off = 0
    for i in range(12):
        trial = study.ask()
        plan, reasons = d.plan_trial(trial)
        p = plan.params
        assert ("speculative_tokens" in p) == (p["speculative_method"] != "none"), p
        assert not reasons, reasons
        if p["speculative_method"] == "none":
            seen_off += 1
        else:
            seen_on += 1
            assert 1 <= p["speculative_tokens"] <= 4
        est = fidelity.estimate("llama-3.2-1b", "h100", p, [], {})  # no scenarios: just the config check
        assert "error" not in est
        tps = 1000 + 3 * p["max_concurrency"] + 50 * p.get("speculative_tokens", 0)
        d.tell(trial, _result(plan, tps=tps, tpot=10 + p["max_concurrency"] / 10))
    assert seen_on and seen_off
    assert len(study.best_trials) >= 1


def test_gp_without_torch_says_what_to_install(tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed")
    d = _driver(tmp_path, extra="baseline: false\n", sampler="{kind: gp}")
    with pytest.raises(ValueError, match="pip install torch"):
        d.open_study()


def test_prescreen_with_grid_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as e:
        p = write_study(tmp_path, extra="fidelity: {prescreen: 4}\n")
        p.write_text(p.read_text().replace("sampler: {kind: tpe, seed: 3}", "sampler: {kind: grid}"))
        load_study(p)
    assert "fidelity.prescreen" in str(e.value) and "grid" in str(e.value)


def test_cost_per_gpu_hour_gives_usd_per_million_tokens(tmp_path):
    d = _driver(tmp_path, extra="cost_per_gpu_hour: 2.0\nbaseline: false\n")
    sr = {"summary": {"output_tokens_per_s": 1000.0}}
    d.scorer.derived_metrics(sr, gpus=2)
    # 2 GPUs x $2/h = $4/h for 3.6 M tokens/h
    assert sr["summary"]["usd_per_million_tokens"] == pytest.approx(4.0 / 3.6)
    assert sr["summary"]["output_tokens_per_s_per_gpu"] == 500.0


def test_usd_objective_is_minimized_end_to_end(tmp_path):
    spec_path = write_study(tmp_path, extra="cost_per_gpu_hour: 3.0\nbaseline: false\n")
    text = spec_path.read_text().replace("- {metric: tpot_p99_ms, scenario: server, direction: minimize}",
                                         "- {metric: usd_per_million_tokens, scenario: server}")
    spec_path.write_text(text)
    spec = load_study(spec_path)
    d = StudyDriver(spec)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    study = d.open_study()
    assert study.directions[1] == optuna.study.StudyDirection.MINIMIZE
    _, r = _ask_tell(d, study, tps=3600.0, tpot=20)
    gpus = r.gpus
    assert r.objectives["server.usd_per_million_tokens"] == pytest.approx(3.0 * gpus / (3600 * 3600) * 1e6)


def test_calibration_reduces_error_on_synthetic_ground_truth():
    """Ground truth = the estimator with a systematic bias (x1.6 throughput, x0.7 TPOT, x1.3 TTFT) and 5 %
    lognormal noise. Fitted on 6 configs, the calibrated estimator is close on 6 others."""
    rng = random.Random(0)
    configs = [{"max_concurrency": c, "max_batched_tokens": b} for c in (16, 32, 64, 128, 256, 512)
               for b in (2048, 8192)]
    rng.shuffle(configs)
    bias = {"output_tokens_per_s": 1.6, "tpot_p99_ms": 0.7, "ttft_p99_ms": 1.3}
    pairs = []
    for p in configs:
        est = fidelity.estimate("llama-3.2-1b", "h100", p, [_Scn()], {"kind": "random", "input_tokens": 256,
                                                                        "output_tokens": 64, "n": 60},
                                max_requests=60)["offline"]["summary"]
        truth = {k: est[k] * f * math.exp(rng.gauss(0, 0.05)) for k, f in bias.items()}
        pairs.append((est, truth))
    train, test = pairs[:6], pairs[6:]
    cal = fidelity.Calibration.fit(train)
    assert cal.scale["throughput"] == pytest.approx(1.6, rel=0.1)
    assert cal.scale["tpot"] == pytest.approx(0.7, rel=0.1)
    for metric in bias:
        raw = [abs(math.log(m[metric] / e[metric])) for e, m in test]
        calib = [abs(math.log(m[metric] / cal.apply(e)[metric])) for e, m in test]
        assert max(calib) < 0.15 and sum(calib) < sum(raw) / 2, metric
    rep = fidelity.Calibration.report(pairs)
    for metric in bias:
        assert rep["error_after"][metric] < rep["error_before"][metric]


class _Scn:
    label = "offline"
    settings = {"kind": "offline", "num_requests": 60}


def test_prescreen_enqueues_the_best_estimated_candidate(tmp_path):
    d = _driver(tmp_path, search="""
      max_concurrency: [4, 16, 64, 256]
      quantization: [none, fp8]
    """, extra="baseline: false\nfidelity: {prescreen: 6, max_requests: 40}\n")
    study = d.open_study()
    d.sampler.arm()  # as the loop does before it asks for a trial
    trial = study.ask()
    picked = d.sampler.taken(trial.number)
    assert picked is not None and picked["chosen"]["candidates"] == 6
    plan, _ = d.plan_trial(trial)
    chosen = [c for c in picked["candidates"] if c["params"] == plan.params]
    assert chosen, (plan.params, picked["candidates"])
    assert picked["chosen"]["values"] is not None
    # the real study holds only the launched trial: candidates are never told to it
    assert len(study.trials) == 1


def test_noise_aware_dominance():
    assert noise.dominates([110, 20], [100, 21], [2, 1], [2, 1], ["maximize", "minimize"])
    # better by less than the noise on every objective: a tie, neither dominates
    assert not noise.dominates([101, 20], [100, 20.5], [2, 1], [2, 1], ["maximize", "minimize"])
    front = noise.noise_aware_front({1: [100, 20], 2: [101, 20.2], 3: [50, 40]}, {1: [3, 1], 2: [3, 1], 3: [3, 1]},
                                    ["maximize", "minimize"])
    assert front == [1, 2]
    s = noise.mean_ci([10.0, 11.0, 12.0])
    assert s["mean"] == pytest.approx(11.0) and s["ci"] == pytest.approx(2.484, rel=1e-3)


@pytest.mark.parametrize("scenario, message", [
    ("{kind: concurrency}", "needs concurrency"),
    ("{kind: concurrency, concurrency: [8, 4]}", "ascending"),
    ("{kind: server, qps: 2, concurrency: 4}", "applies to kind: concurrency"),
])
def test_concurrency_scenario_spec_errors(tmp_path, scenario, message):
    p = write_study(tmp_path)
    p.write_text(p.read_text().replace(
        "- {kind: server, qps: 4, duration_s: 3, sla: {ttft_p99_ms: 2000, tpot_p99_ms: 100}}", "- " + scenario))
    with pytest.raises(SpecError, match=message):
        load_study(p)


def test_estimator_answers_a_max_qps_scenario_with_the_highest_valid_rate():
    sc = ScenarioPlan(label="server", settings={"kind": "server", "qps": 1.0, "duration_s": 20,
                                                "ttft_limit_ms": 2000, "tpot_limit_ms": 100},
                      max_qps={"lo": 1.0, "hi": 100.0, "tolerance": 0.05, "max_levels": 8})
    est = fidelity.estimate("llama-3.1-8b", "h100", {"max_concurrency": 256}, [sc],
                            {"kind": "random", "input_tokens": 1024, "output_tokens": 128})
    rate = est["server"]["summary"]["max_valid_qps"]
    # prefill alone (~14 TFLOP per 1024-token prompt) caps an 8b on one H100 well below 100 req/s
    assert 1.0 < rate < 100.0


def test_a_server_run_that_did_not_keep_up_misses_the_sla_within_its_p99_limits(tmp_path):
    d = _driver(tmp_path)
    assert d.constraint_names() == ["server.ttft_p99", "server.tpot_p99", "server.steady", "failed"]

    def judged(steady):
        summary = {"output_tokens_per_s": 1000.0, "tpot_p99_ms": 50.0, "ttft_p99_ms": 300.0}
        if steady is not None:
            summary["steady_state_met"] = steady
        scenarios = {"server": {"summary": summary}}
        values, named, _ = d.score(scenarios, 1)
        return named["server.steady"], scenarios["server"]["sla_met"]

    assert judged(1.0) == (0.0, True)
    assert judged(0.0) == (1.0, False)  # p99 within the limits, backlog growing: not met
    assert judged(None) == (0.0, True)  # an estimate (or an older record) carries no verdict
    d.spec.workload.scenarios[0].min_keep_up = None
    assert "server.steady" not in d.constraint_names()
