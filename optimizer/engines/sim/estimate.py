"""In-process estimates: the sim's scheduler and roofline run in virtual time, no HTTP and no sleeping.

A cheap first fidelity for a configuration (milliseconds for a few hundred requests) that agrees with the
sim server by construction: both drive the same :class:`Scheduler`.

Calibration against vLLM on one H100 SXM (llama-3.1-8b bf16, 1024 input / 256 output tokens, 400 prompts
offline, vLLM defaults max_num_seqs=1024, max_num_batched_tokens=8192, gpu_memory_utilization=0.92):

====================================  ======================  =====================
setting                               real vLLM               this estimator
====================================  ======================  =====================
defaults                              ~5,000 out tok/s,       ~5,200 out tok/s,
                                      p99 TPOT ~66 ms         p99 TPOT ~65 ms
max_num_seqs=128                      ~4,600 out tok/s,       ~4,700 out tok/s,
                                      p99 TPOT 25 ms          p99 TPOT ~25 ms
====================================  ======================  =====================

(``tests/test_sim_directions.py::test_calibration_h100_llama8b`` keeps these within a loose band.) The
shape of the numbers comes out of the model rather than from tuning: at 128 sequences a decode step reads
16 GB of weights plus ~19 GB of KV (~14 ms at 80 % of 3.35 TB/s), and a sequence's TPOT also absorbs the
~190 ms prompt-chunk steps of the requests admitted after it.
"""
from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

import numpy as np

from servetune.optimizer.engines.sim.config import SimConfig, memory_plan
from servetune.optimizer.engines.sim.scheduler import Scheduler, SimRequest
from servetune.optimizer.perfmodel.hardware import GpuSpec, get_gpu
from servetune.optimizer.perfmodel.model_shapes import ModelShape


def _shape(shape: ModelShape | str | dict) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    if isinstance(shape, dict):
        return ModelShape.from_config(shape)
    return ModelShape.load(preset=shape)


def _gpu(gpu: GpuSpec | str) -> GpuSpec:
    return gpu if isinstance(gpu, GpuSpec) else get_gpu(gpu)


def _config(params: SimConfig | dict[str, Any] | None) -> SimConfig:
    return params if isinstance(params, SimConfig) else SimConfig.from_params(params)


def _lengths(x: int | Sequence[int], n: int) -> list[int]:
    if isinstance(x, int):
        return [x] * n
    if len(x) != n:
        raise ValueError(f"expected {n} lengths, got {len(x)}")
    return [int(v) for v in x]


def _run_replica(sched: Scheduler, reqs: list[SimRequest]) -> None:
    """Drive one replica in virtual time: arrivals join the queue at the first step boundary after them."""
    t, i, n = 0.0, 0, len(reqs)
    while True:
        while i < n and reqs[i].arrival <= t:
            sched.add(reqs[i])
            i += 1
        if not sched.has_work():
            if i >= n:
                return
            t = reqs[i].arrival
            continue
        res = sched.step()
        if res is None:
            raise RuntimeError("sim scheduler stalled with queued work")  # a scheduler bug, never a config
        t += res.duration_s
        for req, _ in res.emitted:
            if req.first_token_time is None:
                req.first_token_time = t
        for req in res.finished:
            req.finish_time = t


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def simulate(shape: ModelShape | str | dict, gpu: GpuSpec | str, params: SimConfig | dict[str, Any] | None,
             requests: Iterable[SimRequest]) -> dict[str, Any]:
    """Run ``requests`` (with arrival times) to completion; requests go round-robin to the dp replicas in
    arrival order, as the sim server does. The request objects are consumed: they carry their timestamps
    afterwards. Raises SimStartupError / SimConfigError like the server would."""
    shape, gpu, cfg = _shape(shape), _gpu(gpu), _config(params)
    cfg.validate(shape)
    plan = memory_plan(shape, gpu, cfg)
    reqs = sorted(requests, key=lambda r: r.arrival)
    dp = cfg.data_parallel
    scheds = [Scheduler(shape, gpu, cfg, plan=plan, seed=cfg.seed * 1000 + k) for k in range(dp)]
    for k, sched in enumerate(scheds):
        _run_replica(sched, reqs[k::dp])

    done = [r for r in reqs if r.finish_time is not None]
    if not done:
        raise ValueError("no requests to simulate")
    arrival = np.array([r.arrival for r in done])
    first = np.array([r.first_token_time for r in done])
    finish = np.array([r.finish_time for r in done])
    out = np.array([r.output for r in done], dtype=float)
    multi = out > 1
    tpot = (finish[multi] - first[multi]) / (out[multi] - 1)
    ttft = first - arrival
    e2e = finish - arrival
    start = float(arrival.min())
    duration = float(finish.max()) - start
    total_out = float(out.sum())
    total_in = float(sum(r.prompt_len for r in done))
    steps = sum(s.stats.steps for s in scheds)
    queries = sum(s.stats.prefix_queries for s in scheds)
    drafts = sum(s.stats.spec_drafts for s in scheds)
    return {
        "num_requests": len(done),
        "duration_s": duration,
        "output_tokens_per_s": total_out / duration,
        "output_tokens_per_s_per_gpu": total_out / duration / cfg.gpus,
        "total_tokens_per_s": (total_out + total_in) / duration,
        "requests_per_s": len(done) / duration,
        "ttft_mean_ms": float(ttft.mean()) * 1e3,
        "ttft_p50_ms": _pct(ttft, 50) * 1e3,
        "ttft_p99_ms": _pct(ttft, 99) * 1e3,
        "tpot_mean_ms": float(tpot.mean()) * 1e3 if tpot.size else float("nan"),
        "tpot_p50_ms": _pct(tpot, 50) * 1e3,
        "tpot_p99_ms": _pct(tpot, 99) * 1e3,
        "e2e_mean_ms": float(e2e.mean()) * 1e3,
        "e2e_p99_ms": _pct(e2e, 99) * 1e3,
        "mean_batch_size": sum(s.stats.running_sum for s in scheds) / max(1, steps),
        "steps": steps,
        "preemptions": sum(s.stats.preemptions for s in scheds),
        "prefix_cache_hit_rate": sum(s.stats.prefix_hits for s in scheds) / queries if queries else 0.0,
        "spec_acceptance_rate": sum(s.stats.spec_accepted for s in scheds) / drafts if drafts else 0.0,
        "kv_cache_tokens": plan.kv_tokens,
        "weight_gib_per_gpu": plan.weight_bytes_per_gpu / 2**30,
        "gpus": cfg.gpus,
    }


def simulate_offline(shape: ModelShape | str | dict, gpu: GpuSpec | str,
                     params: SimConfig | dict[str, Any] | None = None, n_requests: int = 200,
                     input_tokens: int | Sequence[int] = 1024, output_tokens: int | Sequence[int] = 256,
                     ) -> dict[str, Any]:
    """MLPerf Offline: every request queued at t=0; throughput over the makespan."""
    ins, outs = _lengths(input_tokens, n_requests), _lengths(output_tokens, n_requests)
    reqs = [SimRequest(i, ins[i], outs[i], 0.0) for i in range(n_requests)]
    return simulate(shape, gpu, params, reqs)


def simulate_server(shape: ModelShape | str | dict, gpu: GpuSpec | str,
                    params: SimConfig | dict[str, Any] | None = None, qps: float = 10.0,
                    duration_s: float = 60.0, input_tokens: int | Sequence[int] = 1024,
                    output_tokens: int | Sequence[int] = 256, *, seed: int = 0, poisson: bool = True,
                    ) -> dict[str, Any]:
    """MLPerf Server: ``qps·duration_s`` requests with Poisson (or evenly spaced) arrivals, run to the end."""
    if qps <= 0 or duration_s <= 0:
        raise ValueError("qps and duration_s must be positive")
    n = max(1, int(round(qps * duration_s)))
    ins, outs = _lengths(input_tokens, n), _lengths(output_tokens, n)
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for i in range(n):
        reqs.append(SimRequest(i, ins[i], outs[i], t))
        t += rng.expovariate(qps) if poisson else 1.0 / qps
    res = simulate(shape, gpu, params, reqs)
    res["qps"] = qps
    return res
