"""A realistic run directory for report tests, written without the optimizer.

Three scenarios (offline, and server at 8 and at 16 queries/s with the MLPerf llama3.1-8b SLA: two load
levels), a baseline, eight
complete trials with real trade-offs (one of them too short a run for loadgen's early stopping, yet within
the SLA), one OOM failure, one rule rejection, one trial that missed the TTFT limit (written without
``sla_met``, as an older optimizer would), one still running, one duplicate of an earlier config, and one
half-written trial.json, plus a matching Optuna SQLite study. The numbers are hand-chosen so tests can state
the fronts they expect (see ``EXPECTED``). Each measured scenario has per-request records
(``requests_<scenario>.csv``, loadgen's columns) drawn to match its summary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState, create_trial

HOSTILE = "<script>alert(1)</script>"
OOM_REASON = ("CUDA out of memory while capturing CUDA graphs for batch 256: "
              "lower max_concurrency or memory_fraction")
REJECT_REASON = "tensor_parallel=4 needs 4 GPUs but max_gpus_per_trial is 2 (rule gpus_per_trial)"
INVALID_REASON = "TTFT p99 9500.0 ms exceeds the 2000 ms limit"  # loadgen's words
SLA_REASON = "p99 TTFT 9,500 ms > 2,000 ms limit"  # the report's, for a trial.json without sla_met
SHORT_RUN_REASON = "TTFT early stopping not met (n=120, need 459 with 0 over the 2000 ms limit at p99)"

STUDY_YAML = """\
name: fixture-study
model:
  preset: llama-3.1-8b
engines: [sim]
hardware:
  gpu: h100
  gpus: 2
  max_gpus_per_trial: 2
search:
  tensor_parallel: [1, 2, 4]
  max_concurrency: [8, 16, 32, 64, 128, 256]
  quantization: [none, fp8]
  kv_cache_dtype: [auto, fp8]
  attention_backend: [auto, flashinfer]
workload:
  dataset: {kind: random, input_tokens: 512, output_tokens: 128, num_requests: 200}
  scenarios:
    - kind: offline
    - kind: server
      qps: 8
      sla: {preset: llama3.1-8b}
    - kind: server
      name: server-16
      qps: 16
      sla: {preset: llama3.1-8b}
objectives:
  - {metric: output_tokens_per_s_per_gpu, scenario: offline, direction: maximize}
  - {metric: tpot_p99_ms, scenario: server, direction: minimize}
sampler: {kind: tpe, seed: 0}
budget: {trials: 16, parallel: 1}
"""

# number: (tp, max_concurrency, quantization, kv_cache_dtype, attention_backend)
PARAMS = {
    0: (1, 256, "none", "auto", "auto"),
    1: (1, 16, "none", "auto", "flashinfer"),
    2: (1, 64, "fp8", "auto", "flashinfer"),
    3: (2, 64, "fp8", "fp8", "flashinfer"),
    4: (1, 128, "fp8", "fp8", "flashinfer"),
    5: (2, 32, "none", "auto", HOSTILE),
    6: (1, 256, "fp8", "fp8", "flashinfer"),
    7: (2, 128, "fp8", "auto", "flashinfer"),
    8: (1, 32, "fp8", "auto", "flashinfer"),
    9: (1, 256, "none", "fp8", "auto"),
    10: (4, 64, "fp8", "auto", "flashinfer"),
    11: (1, 8, "none", "auto", "flashinfer"),
    12: (2, 256, "fp8", "fp8", "flashinfer"),
    13: (1, 64, "fp8", "auto", "flashinfer"),  # trial 2 again: the optimizer reuses its measurement
}
# number: offline (tok/s/GPU, p99 TPOT ms, p99 TTFT ms)
OFFLINE = {0: (2600, 95, 21000), 1: (700, 18, 60000), 2: (2400, 28, 16000), 3: (1500, 17, 12000),
           4: (3500, 40, 9000), 5: (900, 16, 30000), 6: (4300, 62, 8000), 7: (2100, 24, 10000),
           8: (1500, 21, 25000), 11: (420, 14, 90000)}
# number: server (output tok/s, p99 TPOT ms, p99 TTFT ms)
SERVER = {0: (1010, 38.0, 210), 1: (985, 22.0, 1450), 2: (1012, 26.0, 180), 3: (1015, 15.0, 95),
          4: (1013, 29.0, 150), 5: (1008, 19.5, 120), 6: (1011, 31.0, 160), 7: (1016, 16.5, 90),
          8: (1005, 24.0, 600), 11: (700, 21.0, 9500)}
# number: server-16, the same server at twice the load (output tok/s, p99 TPOT ms, p99 TTFT ms). The small
# batches queue (1, 5, 8, 11 miss the TTFT limit), and the fastest (6) misses it too: the SLA costs 6's lead.
SERVER16 = {0: (2000, 55.0, 400), 1: (1100, 30.0, 8000), 2: (2010, 38.0, 300), 3: (2025, 21.0, 150),
            4: (2020, 41.0, 250), 5: (1900, 27.0, 2600), 6: (2060, 45.0, 2300), 7: (2030, 23.0, 140),
            8: (1500, 33.0, 5200), 11: (800, 25.0, 30000)}

EXPECTED: dict[str, Any] = {
    "trials": 14,  # readable trial files (0..13); 14 is half written
    "skipped": 1,
    # server: output tok/s/GPU (max) vs p99 TPOT (min), SLA-valid only; 11 would be on it were it valid
    "server_tpot_per_gpu_front": [3, 7, 1, 8, 2, 4],
    # the study objectives (offline tok/s/GPU max, server p99 TPOT min), SLA met in both scenarios;
    # 13 repeats 2's config and measurement, so it ties with it
    "objective_front": {2, 3, 4, 6, 7, 13},
    "best_offline_per_gpu": (6, 4300.0),
    "baseline": 0,
    # server-16 output tok/s: best with no latency limit (6), best within the SLA (7)
    "server16_sla_cost": ((6, 2060.0), (7, 2030.0)),
    "server16_sla_missed": {1, 5, 6, 8, 11},
    "csv_requests": 60,  # ok requests per requests_<scenario>.csv (plus one timeout, excluded)
}


def _summary(out_tps: float, gpus: int, tpot: float, ttft: float, n_ok: int, duration: float) -> dict:
    return {
        "output_tokens_per_s": out_tps, "output_tokens_per_s_per_gpu": round(out_tps / gpus, 2),
        "tokens_per_s_per_user": round(1000.0 / (tpot * 0.8), 2), "request_per_s": round(n_ok / duration, 3),
        "ttft_p50_ms": round(ttft * 0.4, 1), "ttft_p90_ms": round(ttft * 0.75, 1), "ttft_p99_ms": float(ttft),
        "tpot_p50_ms": round(tpot * 0.8, 2), "tpot_p99_ms": float(tpot), "itl_p99_ms": round(tpot * 1.3, 2),
        "e2e_p99_ms": round(ttft + 127 * tpot, 1), "e2e_mean_ms": round(0.5 * (ttft + 127 * tpot), 1),
        "error_rate": 0.0, "requests_ok": n_ok,
        "input_tokens_total": 512.0 * n_ok, "output_tokens_total": 128.0 * n_ok,
        # Little's law over the run: requests/s × mean E2E
        "concurrency_mean": round(n_ok / duration * 0.5 * (ttft + 127 * tpot) / 1000, 2),
    }


def _trial(n: int) -> dict:
    if n == 13:
        return {**_trial(2), "number": 13, "duplicate_of": 2, "objectives": {}}
    tp, conc, quant, kv, attn = PARAMS[n]
    t: dict[str, Any] = {
        "number": n, "engine": "sim", "engine_version": "1", "state": "complete", "is_baseline": n == 0,
        "params": {"tensor_parallel": tp, "max_concurrency": conc, "quantization": quant,
                   "kv_cache_dtype": kv, "attention_backend": attn},
        "failure": None, "gpus": tp, "gpu_ids": list(range(tp)),
        "argv": ["python", "-m", "servetune.optimizer.engines.sim", "--tensor-parallel", str(tp)],
        "started_at": f"2026-11-22T02:{40 + n:02d}:00Z", "ready_s": 1.2 + 0.1 * tp, "wall_s": 40.0 + n,
        "scenarios": {}, "metrics_delta": {}, "objectives": {},
    }
    if n == 9:
        t.update(state="failed", failure={"kind": "oom", "reason": OOM_REASON}, ready_s=None, wall_s=8.5)
        return t
    if n == 10:
        t.update(state="rejected", failure={"kind": "rejected", "reason": REJECT_REASON}, gpus=0, gpu_ids=[],
                 argv=[], started_at=None, ready_s=None, wall_s=0.0)
        return t
    if n == 12:
        t.update(state="running", ready_s=None, wall_s=None)
        return t
    tpg, otpot, ottft = OFFLINE[n]
    off = _summary(tpg * tp, tp, otpot, ottft, 200, 200 * 128 / (tpg * tp))
    stps, stpot, sttft = SERVER[n]
    srv = _summary(stps, tp, stpot, sttft, 120, 15.2)
    hps, htpot, httft = SERVER16[n]
    hi = _summary(hps, tp, htpot, httft, 240, 15.4)
    sla_met = sttft <= 2000 and stpot <= 100
    reasons = [] if sla_met else [INVALID_REASON]
    if n == 1:
        reasons = [SHORT_RUN_REASON]
    t["scenarios"] = {
        "offline": {"scenario": "offline", "settings": {"num_requests": 200},
                    "duration_s": round(200 * 128 / (tpg * tp), 2), "valid": True, "invalid_reasons": [],
                    "summary": off},
        "server": {"scenario": "server", "settings": {"qps": 8, "ttft_limit_ms": 2000, "tpot_limit_ms": 100},
                   "duration_s": 15.2, "valid": not reasons, "invalid_reasons": reasons, "notes": [],
                   "summary": srv},
    }
    t["scenarios"]["server-16"] = {
        "scenario": "server", "settings": {"qps": 16, "ttft_limit_ms": 2000, "tpot_limit_ms": 100},
        "duration_s": 15.4, "valid": httft <= 2000, "invalid_reasons": [] if httft <= 2000 else [
            f"TTFT p99 {httft:.1f} ms exceeds the 2000 ms limit"], "notes": [], "summary": hi,
        "metrics_delta": {"vllm:num_preemptions_total": float(conc >= 256) * 3, "vllm:prompt_tokens_total": 122880.0}}
    if n != 11:
        t["scenarios"]["server"]["sla_met"] = sla_met
        t["scenarios"]["server-16"]["sla_met"] = httft <= 2000 and htpot <= 100
    t["scenarios"]["server"]["metrics_delta"] = {"vllm:num_preemptions_total": float(conc >= 256),
                                                 "vllm:prompt_tokens_total": 61440.0}
    # the whole trial's change, offline included (whose own delta was not scraped)
    t["metrics_delta"] = {"vllm:num_preemptions_total": float(conc >= 256) * 5, "vllm:prompt_tokens_total": 286720.0}
    t["objectives"] = {"offline.output_tokens_per_s_per_gpu": off["output_tokens_per_s_per_gpu"],
                       "server.tpot_p99_ms": srv["tpot_p99_ms"]}
    return t


def write_run(run_dir: str | Path, *, with_db: bool = True) -> Path:
    """Write the fixture run directory; returns it. ``with_db=False`` leaves out study.db (remote storage)."""
    run_dir = Path(run_dir)
    (run_dir / "trials").mkdir(parents=True, exist_ok=True)
    (run_dir / "study.yaml").write_text(STUDY_YAML, encoding="utf-8")
    trials = [_trial(n) for n in sorted(PARAMS)]
    for t in trials:
        d = run_dir / "trials" / f"{t['number']:04d}"
        d.mkdir(exist_ok=True)
        (d / "trial.json").write_text(json.dumps(t, indent=1), encoding="utf-8")
        log = [f"INFO starting sim engine tp={t['params']['tensor_parallel']}"]
        if t["state"] == "failed":
            log += ["INFO capturing CUDA graphs", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                    "2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.10 GiB is free."]
        if t["state"] != "rejected":
            (d / "engine.log").write_text("\n".join(log) + "\n", encoding="utf-8")
        for name, sc in t["scenarios"].items():
            _write_records(d / f"requests_{name}.csv", sc["summary"], seed=t["number"] * 7 + len(name))
    # The driver running it: this process (a trial of a study nobody runs is shown as interrupted).
    (run_dir / "sessions.json").write_text(json.dumps([{"started": "2026-11-22T03:00:00+00:00", "ended": None,
                                                        "pid": os.getpid()}]), encoding="utf-8")
    # A trial the optimizer is writing right now: cut mid-file.
    half = run_dir / "trials" / "0014"
    half.mkdir(exist_ok=True)
    (half / "trial.json").write_text('{"number": 14, "engine": "sim", "state": "compl', encoding="utf-8")
    if with_db:
        _write_study_db(run_dir / "study.db", trials)
    return run_dir


def _write_records(path: Path, summary: dict, seed: int) -> None:
    """Per-request records in loadgen's CSV columns whose p99s match the summary (the last sample is the
    p99 and the rest lie below it), plus one timed-out request that the latency curves must leave out."""
    rng = np.random.default_rng(seed)
    n = EXPECTED["csv_requests"]
    cols = ["index", "sample", "warmup", "status", "error", "scheduled_s", "sent_s", "first_byte_s", "done_s",
            "ttft_ms", "tpot_ms", "e2e_ms", "input_tokens", "output_tokens"]
    lines = [",".join(cols)]
    ttft = np.sort(summary["ttft_p99_ms"] * np.clip(rng.lognormal(-0.9, 0.45, n), 0.05, 1.0))
    tpot = np.sort(summary["tpot_p99_ms"] * np.clip(rng.lognormal(-0.25, 0.12, n), 0.3, 1.0))
    ttft[-1], tpot[-1] = summary["ttft_p99_ms"], summary["tpot_p99_ms"]
    rng.shuffle(ttft)
    rng.shuffle(tpot)
    for i in range(n):
        sched = i * 0.125
        e2e = ttft[i] + 127 * tpot[i]
        lines.append(f"{i},{i},False,ok,,{sched:.4f},{sched + 0.001:.4f},{sched + ttft[i] / 1e3:.4f},"
                     f"{sched + e2e / 1e3:.4f},{ttft[i]:.3f},{tpot[i]:.4f},{e2e:.3f},512,128")
    lines.append(f"{n},{n},False,timeout,timed out after 600 s,{n * 0.125:.4f},{n * 0.125:.4f},,,,,,512,0")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_study_db(path: Path, trials: list[dict]) -> None:
    dists: dict[str, BaseDistribution] = {"tensor_parallel": CategoricalDistribution([1, 2, 4]),
             "max_concurrency": CategoricalDistribution([8, 16, 32, 64, 128, 256]),
             "quantization": CategoricalDistribution(["none", "fp8"]),
             "kv_cache_dtype": CategoricalDistribution(["auto", "fp8"]),
             "attention_backend": CategoricalDistribution(["auto", "flashinfer", HOSTILE])}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name="fixture-study", storage=f"sqlite:///{path.resolve()}",
                                    directions=["maximize", "minimize"], load_if_exists=True)
        by_number = {t["number"]: t for t in trials}
        for t in trials:
            state = {"complete": TrialState.COMPLETE, "running": TrialState.RUNNING}.get(t["state"], TrialState.FAIL)
            measured = by_number[t.get("duplicate_of", t["number"])]["objectives"]  # a duplicate reuses its values
            study.add_trial(create_trial(
                params=t["params"], distributions=dists,
                values=list(measured.values()) if state == TrialState.COMPLETE else None, state=state,
                user_attrs={"servetune_number": t["number"]}))
    finally:
        optuna.logging.set_verbosity(verbosity)


if __name__ == "__main__":  # python tests/report_fixtures.py /tmp/run && open /tmp/run/report.html
    import sys

    from servetune.reports import write_report

    print(write_report(write_run(sys.argv[1] if len(sys.argv) > 1 else "/tmp/servetune-fixture-run")))
