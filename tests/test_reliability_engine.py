"""Engine and worker faults in real studies: real fake-engine processes, real Ray, real Optuna SQLite.

One Ray instance serves the module (declared 4 GPUs); each study runs in-process so that after it we can ask
Ray whether every GPU slot came back. After every study: no process carrying the study's marker is alive, no
pid file is left, no trial's port is still listening.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest

from fake_engine import MODES
from reliability_helpers import (
    WORKER_ENV,
    assert_nothing_leaked,
    fake_study,
    marked_pids,
    ray_gpus_back,
    ray_local,  # noqa: F401  (the session's Ray instance)
    run_study_inprocess,
    trials,
)
from servetune.optimizer import lifecycle, process
from servetune.optimizer.driver import dataset_args, resolve_model, scenario_plans
from servetune.optimizer.records import TrialPlan
from servetune.optimizer.spec import load_study

pytestmark = pytest.mark.slow


# fault (fake_engine.MODES[trial number]) -> (state, failure kind, words in the reason)
EXPECTED = {
    "ok": ("complete", None, None),
    "crash_start": ("failed", "crash", "fake engine failed while loading weights"),
    # its 4th request: in the warm-up's third ramp step, or in the first level when a loaded machine spent
    # the warm-up's time bound on the first two steps (seen once in a full run next to other test runs)
    "crash_mid_load": ("failed", "crash_under_load", "died during"),
    "hang": ("failed", "timeout", "not healthy after"),
    "no_tokens": ("failed", "load_errors", "streamed no output tokens"),
    "oom": ("failed", "oom", "out of memory"),
    "bad_flag": ("failed", "bad_args", "unrecognized arguments"),
    "port_taken": ("failed", "crash", "already in use"),
    "sigterm_ignored": ("complete", None, None),
    "http500": ("failed", "load_errors", "http_500"),
    "fatal_log": ("failed", "crash", "stayed up: ERROR RuntimeError: CUDA error: an illegal memory access"),
}


@pytest.mark.usefixtures("ray_local")
def test_every_engine_fault_fails_its_trial_with_its_reason_and_leaks_nothing(tmp_path):
    assert list(EXPECTED) == MODES
    study, marker = fake_study(tmp_path, fake_args=["--fault-by-trial"], sampler="random",
                               search="memory_fraction: {low: 0.5, high: 0.95}", trials=len(MODES), parallel=3,
                               ready_timeout_s=6, gpus=4)
    t0 = time.monotonic()
    outcome = run_study_inprocess(study)
    wall = time.monotonic() - t0
    run = tmp_path / "run"
    got = trials(run)
    assert len(got) == len(MODES), "the study must go on past every fault"
    assert outcome.stopped_because == "trial budget reached"
    problems = []
    for t in got.values():
        mode = MODES[t["number"]]
        state, kind, words = EXPECTED[mode]
        failure = t.get("failure") or {}
        if t["state"] != state or failure.get("kind") != kind or (words and words not in failure.get("reason", "")):
            problems.append(f"{mode}: {t['state']} {failure}")
        if state == "failed":
            assert failure.get("reason"), mode
    assert not problems, "\n".join(problems)
    by_mode = {MODES[t["number"]]: t for t in got.values()}
    # the SIGTERM-ignoring engine was measured, then SIGKILLed after the grace, and the log says so
    log = (run / "trials" / f"{by_mode['sigterm_ignored']['number']:04d}" / "engine.log").read_text()
    assert "ignored SIGTERM" in log
    # the port-taken engine was relaunched once on a fresh port before the trial was given up
    log = (run / "trials" / f"{by_mode['port_taken']['number']:04d}" / "engine.log").read_text()
    assert "relaunching on a fresh port" in log
    # Optuna knows the same (failures are told as FAIL, or as pessimistic infeasible results to learn from)
    st = optuna.load_study(study_name="faults", storage=f"sqlite:///{run / 'study.db'}")
    assert all(t.state.is_finished() for t in st.trials) and len(st.trials) == len(MODES)
    told = sorted(t.user_attrs.get("servetune.state") for t in st.trials)
    assert told.count("complete") == 2 and told.count("failed") == len(MODES) - 2, told
    for t in st.trials:
        if t.user_attrs.get("servetune.state") == "failed":
            assert t.state.name == "FAIL" or t.user_attrs.get("servetune.pessimistic"), t.user_attrs
    assert_nothing_leaked(run, marker)
    assert ray_gpus_back(4) == 4, "a GPU slot was not given back to Ray"
    assert wall < 120, f"fault study took {wall:.0f} s"


@pytest.mark.usefixtures("ray_local")
def test_killed_ray_worker_fails_trial_as_internal_reaps_engine_and_study_goes_on(tmp_path):
    # the fake engine spawns a worker child: both must be reaped from the pid file when the Ray worker dies
    study, marker = fake_study(tmp_path, name="workerkill", fake_args=["--spawn-child"], sampler="random",
                               search="memory_fraction: {low: 0.5, high: 0.95}", trials=3, parallel=1,
                               duration_s=4, qps=2)
    run = tmp_path / "run"
    box: dict = {}

    def drive():
        try:
            box["outcome"] = run_study_inprocess(study)
        except BaseException as e:  # surfaced below
            box["error"] = e

    th = threading.Thread(target=drive, daemon=True)
    th.start()
    victim_trial = None
    engine_pids: list[int] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and victim_trial is None:
        for pid_file in sorted((run / "trials").glob("*/engine.pid")) if (run / "trials").exists() else []:
            try:
                t = json.loads((pid_file.parent / "trial.json").read_text())
                pgid = json.loads(pid_file.read_text())["pgid"]
            except (OSError, ValueError):
                continue
            if t.get("ready_s") is None and len(marked_pids(marker)) < 2:
                continue  # wait until the engine and its child are both up
            worker = int(open(f"/proc/{pgid}/stat").read().rsplit(")", 1)[1].split()[1])  # the engine's parent
            engine_pids = marked_pids(marker)
            os.kill(worker, signal.SIGKILL)
            victim_trial = int(pid_file.parent.name)
            break
        time.sleep(0.2)
    assert victim_trial is not None, "no trial reached a running engine"
    th.join(timeout=150)
    assert not th.is_alive(), "the driver hung after its Ray worker was killed"
    assert "error" not in box, box.get("error")
    got = trials(run)
    assert len(got) == 3
    victim = got[victim_trial]
    assert victim["state"] == "failed" and victim["failure"]["kind"] == "internal", victim
    assert "Ray worker died" in victim["failure"]["reason"]
    assert all(t["state"] == "complete" for n, t in got.items() if n != victim_trial), got
    assert engine_pids and not any(os.path.exists(f"/proc/{p}") and p in marked_pids(marker) for p in engine_pids)
    assert_nothing_leaked(run, marker)
    assert ray_gpus_back(4) == 4


def test_slow_gpu_memory_release_is_waited_for_and_a_stuck_gpu_fails_internal(tmp_path, monkeypatch):
    """A fake ``nvidia-smi`` on PATH reports GPU 0 busy for a while (then free), GPU 1 busy for ever."""
    free_at = time.time() + 2.0
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text("#!" + os.path.realpath(sys.executable) + "\n"
                   "import time\n"
                   f"busy0 = time.time() < {free_at}\n"
                   "print('0, %d' % (30000 if busy0 else 5))\n"
                   "print('1, 70000')\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(lifecycle, "GPU_FREE_TIMEOUT_S", 6.0)
    assert process.gpus_memory_used_mib([0, 1]) in ({0: 30000.0, 1: 70000.0}, {0: 5.0, 1: 70000.0})

    study, marker = fake_study(tmp_path, name="gpuwait", fake_args=[], search="max_concurrency: [8]", trials=1,
                               sampler="random")
    spec = load_study(str(study))

    def plan(n: int) -> TrialPlan:
        es = spec.engines[0]
        return TrialPlan(number=n, engine="sim", params={"max_concurrency": 8}, model=resolve_model(spec), gpus=1,
                         trial_dir=str(tmp_path / "run" / "trials" / f"{n:04d}"), dataset=dataset_args(spec),
                         scenarios=scenario_plans(spec), engine_command=es.command, extra_env=dict(es.env),
                         ready_timeout_s=8, fake_gpus=False)

    t0 = time.monotonic()
    ok = lifecycle.run_trial(plan(0), [0])  # GPU 0 frees after ~2 s: the trial waits, then runs
    assert ok.state == "complete", ok.failure
    assert time.time() >= free_at and time.monotonic() - t0 >= 1.5
    stuck = lifecycle.run_trial(plan(1), [1])  # GPU 1 never frees: no launch, an internal failure
    assert stuck.state == "failed" and stuck.failure["kind"] == "internal"
    assert "still hold memory" in stuck.failure["reason"] and stuck.argv == []
    assert_nothing_leaked(tmp_path / "run", marker)


def test_ctrl_c_of_the_driver_stops_every_engine_and_the_rerun_finishes(tmp_path):
    """SIGINT (Ctrl-C) mid-study: exit 130, no engine left running, no pid file; the rerun completes."""
    study, marker = fake_study(tmp_path, name="ctrlc", fake_args=["--spawn-child"], sampler="random",
                               search="memory_fraction: {low: 0.5, high: 0.95}", trials=3, parallel=2,
                               duration_s=3, qps=3)
    run = tmp_path / "run"
    env = {**os.environ, **WORKER_ENV}
    cmd = [sys.executable, "-m", "servetune.optimizer.cli", "run", str(study), "--no-report"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(marked_pids(marker)) >= 4:  # two engines, each with its worker child
                break
            time.sleep(0.2)
        else:
            pytest.fail("two engines never ran at once")
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, out
    assert out.index("stopping the running trials") < out.index("completed trials are saved")
    assert_nothing_leaked(run, marker)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed" in rerun.stdout
    st = optuna.load_study(study_name="ctrlc", storage=f"sqlite:///{run / 'study.db'}")
    counted = [t for t in st.trials if not t.user_attrs.get("servetune.stale")]
    assert len(counted) == 3 and all(t.state.is_finished() for t in st.trials)
    assert_nothing_leaked(run, marker)
