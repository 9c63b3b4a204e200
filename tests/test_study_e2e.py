"""The whole chain, for real: study file → Optuna (SQLite) → Ray tasks → sim HTTP servers → loadgen → report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from reliability_helpers import LOOPBACK_HEX, listening_sockets
from servetune.optimizer import ray_local
from study_fixtures import write_study

pytestmark = pytest.mark.slow


def _servetune(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servetune.optimizer.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def _trial_files(run: Path) -> dict[int, dict]:
    out = {}
    for p in sorted((run / "trials").glob("*/trial.json")):
        out[int(p.parent.name)] = json.loads(p.read_text())
    return out


def _exe(pid: int) -> str:
    """The program a process runs (for messages and to know Ray's servers among the recorded processes)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"
    return Path(argv0).name or "?"


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_six_trial_study_completes_with_baseline_failure_and_report(tmp_path):
    # memory_fraction 0.05 leaves the 1b model's weights room but no KV: the engine itself fails to start
    study = write_study(tmp_path, search="""
      max_concurrency: [8, 32, 128]
      memory_fraction: [0.05, 0.9]
      tensor_parallel: [1, 2]
    """)
    proc = _servetune("run", str(study))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    trials = _trial_files(run)
    assert len(trials) == 6
    assert trials[0]["is_baseline"] and trials[0]["state"] == "complete"
    states = [t["state"] for t in trials.values()]
    assert states.count("complete") >= 2
    for t in trials.values():
        if t["state"] == "complete":
            s = t["scenarios"]["server"]["summary"]
            assert s["output_tokens_per_s"] > 0 and s["tpot_p99_ms"] > 0
            measured_in = t["duplicate_of"] if t.get("duplicate_of") is not None else t["number"]
            assert (run / "trials" / f"{measured_in:04d}" / "requests_server.csv").exists()
        elif t["state"] == "failed":
            assert t["failure"]["kind"] and t["failure"]["reason"]
    storage = optuna.storages.RDBStorage(f"sqlite:///{run / 'study.db'}")
    st = optuna.load_study(study_name="itest", storage=storage)
    assert len(st.trials) == 6
    assert "Pareto-optimal trials" in proc.stdout
    assert (run / "report.html").exists()
    # no engine process survives the study
    assert not list((run / "trials").glob("*/engine.pid"))


def test_engine_that_fails_to_start_is_recorded_and_study_goes_on(tmp_path):
    study = write_study(tmp_path, trials=3, parallel=1, search="""
      memory_fraction: [0.05]
    """, extra="baseline: false\n")
    proc = _servetune("run", str(study), "--no-report")
    assert proc.returncode == 0, proc.stderr
    trials = _trial_files(tmp_path / "run")
    first = trials[0]
    assert first["state"] == "failed"
    assert first["failure"]["kind"] == "oom", first["failure"]
    # the same config is never relaunched: later trials reuse the failure without starting an engine
    assert all(t["state"] == "failed" for t in trials.values())
    assert any(t.get("duplicate_of") == 0 for t in trials.values())


def test_killed_driver_resumes_without_losing_completed_trials(tmp_path):
    study = write_study(tmp_path, trials=6, parallel=2, duration_s=4)
    run = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "servetune.optimizer.cli", "run", str(study), "--no-report"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            has_trials = (run / "trials").exists()
            done = [t for t in _trial_files(run).values() if t["state"] == "complete"] if has_trials else []
            running = list((run / "trials").glob("*/engine.pid")) if has_trials else []
            if len(done) >= 2 and running:
                break
            time.sleep(0.3)
        else:
            pytest.fail("study never reached 2 complete trials with one running")
        # the driver's own Ray: every socket it and its processes listen on is loopback (read from /proc)
        ray_rec = json.loads((run / "ray.json").read_text())
        ray_pids = ray_local._processes_of(ray_rec)
        assert {"gcs_server", "raylet"} <= {_exe(p) for p in ray_pids}, [_exe(p) for p in ray_pids]
        socks = listening_sockets([driver.pid, *ray_pids])
        assert len({pid for pid, _, _ in socks}) >= 3, socks  # the driver, GCS, raylet (and agents, workers)
        exposed = [(_exe(pid), addr, port) for pid, addr, port in socks if addr not in LOOPBACK_HEX]
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
        temp = Path(ray_rec["temp_dir"])  # private, and where Ray's session lives
        assert temp.stat().st_mode & 0o777 == 0o700 and ray_rec["session_dir"].startswith(str(temp))
        os.kill(driver.pid, signal.SIGSTOP)  # freeze it so nothing finishes between our look and the kill
        before = {n: t for n, t in _trial_files(run).items() if t["state"] == "complete"}
        orphan_pgids = []
        for p in running:
            try:  # an engine that stopped between the glob and now has no pid file any more
                orphan_pgids.append(json.loads(p.read_text())["pgid"])
            except (OSError, ValueError):
                pass
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: Ray and engines are left to fend for themselves
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    left = ray_local._processes_of(ray_rec)  # Ray's agents outlive a killed driver
    proc = _servetune("run", str(study), "--no-report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the rerun ended them (by the record the dead driver left: pids, session dir, token) and removed its temp
    # dir; its own Ray is gone too, with its record
    assert not ray_local._processes_of(ray_rec), f"{len(left)} left after the kill, still running after the rerun"
    assert not temp.exists() and not (run / "ray.json").exists()
    after = _trial_files(run)
    # the interrupted trials were queued again, unless their worker finished them on disk before Ray
    # noticed the dead driver (the rerun then keeps that measurement instead)
    interrupted = [int(p.parent.name) for p in running]
    assert "resumed" in proc.stdout or all(after[n]["state"] == "complete" for n in interrupted), proc.stdout
    for n, t in before.items():  # completed trials are kept: the same measurement, never re-run
        assert after[n]["state"] == "complete"
        for label, sc in t["scenarios"].items():
            kept = after[n]["scenarios"][label]["summary"]
            assert {k: kept[k] for k in sc["summary"]} == sc["summary"]
    st = optuna.load_study(study_name="itest", storage=f"sqlite:///{run / 'study.db'}")
    counted = [t for t in st.trials if not t.user_attrs.get("servetune.stale")]
    assert len(counted) == 6 and all(t.state.is_finished() for t in st.trials)
    for pgid in orphan_pgids:
        assert not _alive(pgid), "an engine orphaned by the killed driver is still running"


def test_validate_reports_file_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {preset: llama-3.1-8b}\nengines: [sim]\n"
                   "workload:\n  scenarios:\n    - {kind: server, qsp: 3}\n"
                   "objectives: [{metric: output_tokens_per_s}]\n")
    proc = _servetune("validate", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:6: workload.scenarios[0].qsp: unknown key 'qsp' (did you mean 'qps'?)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_load_sweep_within_one_launch_reports_max_valid_rate(tmp_path):
    # 1b on an H100 at 600 req/s floods a 8-seq engine: the sweep stops there and keeps the last valid rate
    study = write_study(tmp_path, trials=1, parallel=1, qps="[4, 600]", duration_s=2, search="""
      max_concurrency: [8]
    """, extra="baseline: false\n")
    text = study.read_text().replace("ttft_p99_ms: 2000", "ttft_p99_ms: 500")
    study.write_text(text)
    proc = _servetune("run", str(study), "--no-report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = _trial_files(tmp_path / "run")[0]
    sc = t["scenarios"]["server"]
    assert [lvl["qps"] for lvl in sc["levels"]] == [4, 600]
    assert sc["summary"]["max_valid_qps"] == 4
    assert sc["sla_met"] is True
    assert (tmp_path / "run" / "trials" / "0000" / "requests_server_qps600.csv").exists()


def test_sweep_levels_never_replay_prompts_into_the_prefix_cache(tmp_path):
    # Each level reuses the dataset's first samples; the engine keeps its prefix cache between levels. Were
    # the prompts replayed, later levels would skip their prefill and report capacity the engine lacks.
    study = write_study(tmp_path, trials=1, parallel=1, qps="[4, 8, 12]", duration_s=2, search="""
      max_concurrency: [32]
    """, extra="baseline: false\n")
    study.write_text(study.read_text().replace("duration_s: 2,", "duration_s: 2, warmup_requests: 4,"))
    proc = _servetune("run", str(study), "--no-report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sc = _trial_files(tmp_path / "run")[0]["scenarios"]["server"]
    assert [lvl["qps"] for lvl in sc["levels"]] == [4, 8, 12]
    assert all(lvl["settings"]["warmup_requests"] == 4 for lvl in sc["levels"])  # warm-ups are not replayed
    delta = sc["metrics_delta"]  # the sim's raw vLLM counters over the whole sweep
    assert delta["vllm:prompt_tokens_total"] >= 10 * 128  # every level ran against this one engine
    assert delta["vllm:prefix_cache_queries_total"] == delta["vllm:prompt_tokens_total"]
    assert delta["vllm:prefix_cache_hits_total"] == 0.0


def test_max_qps_search_brackets_the_highest_valid_rate_in_one_launch(tmp_path):
    # max_qps measures lo and hi, then narrows the bracket on the same engine; the trial reports the
    # highest rate that met the SLA, every level it ran (ascending) and why it stopped
    study = write_study(tmp_path, trials=1, parallel=1, qps=4, duration_s=2, search="""
      max_concurrency: [8]
    """, extra="baseline: false\n")
    text = study.read_text().replace("qps: 4,", "max_qps: {lo: 4, hi: 600, tolerance: 0.3, max_levels: 6},")
    text = text.replace("num_requests: 40", "num_requests: 1300")  # no sample repeats within a level
    study.write_text(text.replace("ttft_p99_ms: 2000", "ttft_p99_ms: 500"))
    proc = _servetune("run", str(study), "--no-report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = _trial_files(tmp_path / "run")[0]
    sc = t["scenarios"]["server"]
    rates = [lvl["qps"] for lvl in sc["levels"]]
    assert 3 <= len(rates) <= 6 and rates == sorted(rates) and rates[0] == 4 and rates[-1] == 600
    s = sc["summary"]
    assert 4 <= s["max_valid_qps"] < 600
    assert s["max_qps_bracket_low"] == s["max_valid_qps"] < s["max_qps_bracket_high"] <= 600
    assert s["max_qps_stopped_because"]
    valid = {lvl["qps"]: lvl["valid"] for lvl in sc["levels"]}
    assert valid[s["max_valid_qps"]] and not valid[600]
    assert sc["settings"]["qps"] == s["max_valid_qps"]  # the reported run is the best valid level
    assert t["objectives"], t
    for r in rates:
        assert (tmp_path / "run" / "trials" / "0000" / f"requests_server_qps{r:.4g}.csv").exists()
    assert sc["metrics_delta"]["vllm:prefix_cache_hits_total"] == 0.0


def test_a_per_gpu_rate_bracket_scales_with_the_trials_gpus(tmp_path):
    # per_gpu: a 2-GPU trial searches 2·lo..2·hi, so a sharding search brackets each trial near its capacity
    study = write_study(tmp_path, trials=1, parallel=1, qps=4, duration_s=1, search="""
      tensor_parallel: [2]
      max_concurrency: [8]
    """, extra="baseline: false\n")
    text = study.read_text().replace("qps: 4,", "max_qps: {lo: 2, hi: 300, per_gpu: true, max_levels: 3},")
    study.write_text(text.replace("num_requests: 40", "num_requests: 700"))
    proc = _servetune("run", str(study), "--no-report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = _trial_files(tmp_path / "run")[0]
    assert t["gpus"] == 2
    rates = [lvl["qps"] for lvl in t["scenarios"]["server"]["levels"]]
    assert rates[0] == 4 and rates[-1] == 600 and len(rates) == 3, rates


def test_the_console_says_when_a_trial_waits_for_a_running_one(tmp_path):
    # one configuration on two GPUs: trial 1 is sampled while trial 0 measures it, and takes its result
    study = write_study(tmp_path, trials=2, parallel=2, qps=2, duration_s=1, search="""
      max_concurrency: [16]
    """, extra="baseline: false\n")
    proc = _servetune("run", str(study), "--no-report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trial 1 has the config trial 0 is measuring: it will take that result" in proc.stdout, proc.stdout
    assert proc.stdout.count(" start ") == 1
    assert "(also #1)" in proc.stdout  # one Pareto row for the one config measured
    assert "GPU use: " in proc.stdout
