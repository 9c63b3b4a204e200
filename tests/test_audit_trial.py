"""The audit and the launch warm-up inside one real trial (lifecycle.run_trial on a sim, no Ray), and what
the driver makes of a contaminated scenario."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from servetune.loadgen import progress
from servetune.loadgen.datasets import random_dataset
from servetune.optimizer import lifecycle
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.records import ScenarioPlan
from servetune.optimizer.spec import SpecError, load_study
from servetune.optimizer.warmup import ramp_top
from study_fixtures import write_study

JIT_SIM = "engines: [{name: sim, extra_args: [--emulate-jit, --jit-compile-s, '0.05']}]"


def test_a_trial_warms_up_until_no_jit_and_audits_every_level(tmp_path):
    study = write_study(tmp_path, trials=1, parallel=1, qps="[4, 8]", duration_s=1, search="max_concurrency: [16]")
    study.write_text(study.read_text().replace("engines: [sim]", JIT_SIM))
    driver = StudyDriver(load_study(str(study)))
    plan = driver.build_plan(0, "sim", {}, True, tmp_path / "run" / "trials" / "0000")  # the baseline
    seen: list[tuple[str, dict]] = []
    listener = lambda event, data: seen.append((event, data)) if event.startswith("launch_warmup") else None  # noqa: E731
    progress.add(listener)
    try:
        result = lifecycle.run_trial(plan, [0])
    finally:
        progress.remove(listener)
    assert result.state == "complete", result.failure
    warm = result.warmup
    assert warm["max_concurrency"] == 9  # 8 req/s x 1 s + 1: the most requests a level keeps in flight
    assert warm["rounds"][0]["compile_lines"] > 0 and warm["clean"]
    assert warm["stopped_because"].endswith("compiled nothing")
    # what the progress display is told while it runs: each round as it begins, with what the earlier compiled
    starts = [d for e, d in seen if e == "launch_warmup"]
    assert [d["round"] for d in starts] == list(range(1, len(warm["rounds"]) + 1))
    assert starts[-1]["compiles"] == [r["compile_lines"] for r in warm["rounds"][:-1]] and starts[0]["top"] == 9
    (done,) = [d for e, d in seen if e == "launch_warmup_done"]
    assert done["stopped_because"] == warm["stopped_because"] and done["rounds"] == len(warm["rounds"])
    levels = result.scenarios["server"]["levels"]
    assert [lvl["qps"] for lvl in levels] == [4, 8]
    for lvl in levels:  # the level's own audit; a JIT the ramp missed is re-run once and then clean
        a = lvl["audit"]
        assert a["passed"] and a["log"] is not None and a["server"]["prefix_cache_hits"] == 0
        assert a["server"]["prompt_tokens"] == a["client"]["prompt_tokens"]
    on_disk = json.loads((Path(plan.trial_dir) / "trial.json").read_text())
    assert on_disk["warmup"]["rounds"] == warm["rounds"] and "contaminated" not in on_disk["scenarios"]["server"]


def test_a_contaminated_scenario_is_neither_met_nor_missed(tmp_path):
    driver = StudyDriver(load_study(str(write_study(tmp_path, trials=1))))
    summary = {"output_tokens_per_s_per_gpu": 100.0, "tpot_p99_ms": 500.0, "ttft_p99_ms": 9000.0,
               "audit_contaminated": 1.0}
    scenarios = {"server": {"summary": summary, "contaminated": True}}
    values, constraints, why = driver.score(scenarios, 1)
    assert values is None and scenarios["server"]["sla_met"] is None
    assert why.startswith("contaminated measurement in server")
    summary["audit_contaminated"] = 0.0
    clean = {"server": {"summary": summary}}
    assert driver.score(clean, 1)[0] is not None and clean["server"]["sla_met"] is False  # a real miss


def test_study_keys_for_warmup_and_audit(tmp_path):
    extra = ("  warmup: {max_s: 60, max_concurrency: 32}\n"
             "  audit: {max_prefix_cache_hit_fraction: null, rerun: false}\n")
    study = write_study(tmp_path)
    study.write_text(study.read_text().replace("objectives:", extra + "objectives:"))
    w = load_study(str(study)).workload
    assert (w.warmup.max_s, w.warmup.max_concurrency, w.warmup.enabled) == (60, 32, True)
    assert w.audit.max_prefix_cache_hit_fraction is None and w.audit.rerun is False and w.audit.enabled
    study.write_text(study.read_text().replace("max_s: 60", "max_s: -1"))
    with pytest.raises(SpecError, match=r"study.yaml:\d+: workload.warmup.max_s"):
        load_study(str(study))


def test_the_ramp_reaches_what_a_level_can_hold_while_meeting_its_sla():
    reqs = random_dataset(50, input_tokens=16, output_tokens=128)
    sla = {"ttft_limit_ms": 2000, "tpot_limit_ms": 100}
    search = ScenarioPlan("s", {"kind": "server", "qps": 4, "duration_s": 60, **sla},
                          max_qps={"lo": 4, "hi": 30, "per_gpu": True})
    # 60 req/s (30 per GPU, 2 GPUs) × (2 s + 128 × 0.1 s): 888 requests at most while within the SLA
    assert ramp_top([search], reqs, gpus=2, engine_cap=1024) == 888
    assert ramp_top([search], reqs, gpus=2, engine_cap=256) == 256  # the engine batches no more
    fixed = ScenarioPlan("f", {"kind": "server", "qps": [2, 4], "duration_s": 10})  # no limits: 4 × 10 + 1
    offline = ScenarioPlan("o", {"kind": "offline", "max_connections": 32})
    assert ramp_top([fixed], reqs, 1, None) == 41 and ramp_top([offline, fixed], reqs, 1, None) == 41
    assert ramp_top([ScenarioPlan("c", {"kind": "concurrency", "concurrency": [1, 8, 64]})], reqs, 1, 16) == 16
    assert ramp_top([fixed], reqs, 1, None, given=7) == 7
