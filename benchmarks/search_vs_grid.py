"""Search efficiency: TPE / NSGA-II / random against the vLLM auto_tune-style nested grid, on one landscape.

The landscape is the sim's in-process estimator (``engines.sim.estimate.simulate_offline``): llama-3.1-8b on
H100, 1024 input / 256 output tokens, ``--requests`` prompts offline. The space (720 configurations):
tensor_parallel x max_concurrency x max_batched_tokens x quantization x kv_cache_dtype x memory_fraction x
chunked_prefill. Objectives: output tokens/s/GPU (max) and p99 TPOT (min); SLA: p99 TPOT <= ``--sla-tpot``
ms, given to the samplers as an Optuna constraint (``Trial.set_constraint``). Configurations the engine
refuses (e.g. no chunked prefill with a token budget below the prompt) are infeasible trials.

Metric: trials until the SLA-feasible front's hypervolume reaches 95 % of the exhaustive optimum's
(reference point: 0 tokens/s, the SLA limit). The exhaustive table is computed once (cached in
``--cache``); every strategy then looks its configurations up, so all see the same landscape. Grid order
is the nested loop auto_tune uses (deterministic); the others run ``--seeds`` seeds.

    python benchmarks/search_vs_grid.py            # ~2 min the first time on 2 cores, seconds after
    python benchmarks/search_vs_grid.py --duty     # also the GPU duty cycle of real sim studies
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution

from servetune.optimizer.engines.sim.estimate import simulate_offline
from servetune.optimizer.fidelity import Calibration

SPACE: dict[str, list] = {
    "tensor_parallel": [1, 2, 4],
    "max_concurrency": [32, 64, 128, 256, 512],
    "max_batched_tokens": [512, 2048, 8192],
    "quantization": ["none", "fp8"],
    "kv_cache_dtype": ["auto", "fp8"],
    "memory_fraction": [0.85, 0.95],
    "chunked_prefill": [True, False],
}
NAMES = list(SPACE)
INPUT, OUTPUT = 1024, 256


def _key(p: dict) -> str:
    return json.dumps([p[n] for n in NAMES])


def _evaluate(args: tuple[dict, int]) -> tuple[str, dict]:
    params, n = args
    try:
        r = simulate_offline("llama-3.1-8b", "h100", params, n_requests=n, input_tokens=INPUT, output_tokens=OUTPUT)
    except Exception as e:  # the engine refuses the config or cannot start it: an infeasible trial
        return _key(params), {"error": f"{type(e).__name__}: {e}"[:200]}
    return _key(params), {"tps_gpu": r["output_tokens_per_s_per_gpu"], "tpot_p99_ms": r["tpot_p99_ms"]}


def landscape(cache: Path, n_requests: int) -> dict[str, dict]:
    table: dict[str, dict] = {}
    if cache.exists():
        d = json.loads(cache.read_text())
        if d.get("n_requests") == n_requests and d.get("space") == SPACE:
            return d["table"]
    configs = [dict(zip(NAMES, combo)) for combo in itertools.product(*SPACE.values())]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        for k, v in ex.map(_evaluate, [(c, n_requests) for c in configs], chunksize=8):
            table[k] = v
    print(f"exhaustive landscape: {len(table)} configs in {time.time() - t0:.0f} s", file=sys.stderr)
    cache.write_text(json.dumps({"n_requests": n_requests, "space": SPACE, "table": table}))
    return table


def hypervolume(points: list[tuple[float, float]], sla: float) -> float:
    """2-D hypervolume of (tps_gpu max, tpot min) points against the reference (0, sla)."""
    pts = sorted((p for p in points if p[0] > 0 and p[1] <= sla), key=lambda p: (-p[0], p[1]))
    hv, best_tpot = 0.0, sla
    for tps, tpot in pts:  # descending throughput; each point adds the strip below the best latency so far
        if tpot < best_tpot:
            hv += tps * (best_tpot - tpot)
            best_tpot = tpot
    return hv


def _feasible(v: dict | None, sla: float) -> bool:
    if not v:
        return False
    return "error" not in v and v["tpot_p99_ms"] <= sla


def trials_to_target(sequence: list[dict], table: dict, sla: float, target: float) -> int | None:
    pts: list[tuple[float, float]] = []
    for i, p in enumerate(sequence, 1):
        v = table[_key(p)]
        if _feasible(v, sla):
            pts.append((v["tps_gpu"], v["tpot_p99_ms"]))
            if hypervolume(pts, sla) >= target:
                return i
    return None


def run_sampler(kind: str, seed: int, table: dict, sla: float, budget: int, target: float) -> list[dict]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler: optuna.samplers.BaseSampler
    if kind == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    elif kind == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    dists: dict[str, BaseDistribution] = {n: CategoricalDistribution(v) for n, v in SPACE.items()}
    seq: list[dict] = []
    seen: dict[str, dict | None] = {}
    worst = (0.0, 10 * sla)
    pts: list[tuple[float, float]] = []
    while len(seq) < budget:
        t = study.ask(dists)
        p = dict(t.params)
        k = _key(p)
        v = table[k]
        if k not in seen:  # a repeat costs no launch (the driver's duplicate rule): only new configs count
            seq.append(p)
            seen[k] = v
            if _feasible(v, sla):
                pts.append((v["tps_gpu"], v["tpot_p99_ms"]))
                if hypervolume(pts, sla) >= target:
                    break  # reached: the rest of the budget is not needed for the metric
        if v is None or "error" in v:
            t.set_constraint("failed", 1.0)
            t.set_constraint("tpot_sla", 1.0)
            study.tell(t, list(worst))  # pessimistic values; infeasible, so never on the front
        else:
            t.set_constraint("failed", 0.0)
            t.set_constraint("tpot_sla", v["tpot_p99_ms"] / sla - 1.0)
            study.tell(t, [v["tps_gpu"], v["tpot_p99_ms"]])
        if len(study.trials) > 5 * budget:
            break
    return seq


def run_prescreen(seed: int, table: dict, sla: float, budget: int, target: float, k: int = 8,
                  model_error: float = 0.15) -> list[dict]:
    """TPE + the driver's pre-screen design: K candidates from a shadow study scored by a *wrong* estimator
    (x1.4 throughput, x0.8 TPOT, and a fixed per-config lognormal error of ``model_error``), calibrated on
    the launched trials (``optimizer.fidelity.Calibration``); only the best-scored candidate is launched."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(1000 + seed)
    err = {key: (math.exp(rng.gauss(0, model_error)), math.exp(rng.gauss(0, model_error))) for key in table}

    def estimate(key: str) -> dict | None:
        v = table[key]
        if not v or "error" in v:
            return None  # the estimator shares the engine's config validation
        a, b = err[key]
        return {"output_tokens_per_s": v["tps_gpu"] * 1.4 * a, "tpot_p99_ms": v["tpot_p99_ms"] * 0.8 * b}

    dists: dict[str, BaseDistribution] = {n: CategoricalDistribution(v) for n, v in SPACE.items()}
    real = optuna.create_study(directions=["maximize", "minimize"],
                               sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10))
    seq: list[dict] = []
    seen: set[str] = set()
    pairs: list[tuple[dict, dict]] = []
    pts: list[tuple[float, float]] = []
    worst = [0.0, 10 * sla]

    def tell(study, t, v):
        if v is None:
            t.set_constraint("failed", 1.0)
            t.set_constraint("tpot_sla", 1.0)
            study.tell(t, worst)
        else:
            t.set_constraint("failed", 0.0)
            t.set_constraint("tpot_sla", v[1] / sla - 1.0)
            study.tell(t, list(v))

    while len(seq) < budget:
        cal = Calibration.fit(pairs)
        shadow = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(
            seed=seed * 7919 + len(real.trials), multivariate=True, n_startup_trials=10))
        shadow.add_trials(real.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        best, best_score = None, None
        for _ in range(k):
            t = shadow.ask(dists)
            key = _key(t.params)
            if key in seen:
                shadow.tell(t, state=optuna.trial.TrialState.FAIL)
                continue
            e = estimate(key)
            if e is None:
                tell(shadow, t, None)
                continue
            e = cal.apply(e)
            v = (e["output_tokens_per_s"], e["tpot_p99_ms"])
            tell(shadow, t, v)
            score = (1, hypervolume(pts + [v], sla) - hypervolume(pts, sla), v[0]) if v[1] <= sla else \
                (0, -v[1], v[0])
            if best_score is None or score > best_score:
                best, best_score = dict(t.params), score
        if best is not None:
            real.enqueue_trial(best)
        t = real.ask(dists)
        p = dict(t.params)
        key = _key(p)
        v = table[key]
        ok = bool(v) and "error" not in v
        tell(real, t, (v["tps_gpu"], v["tpot_p99_ms"]) if ok else None)
        if key in seen:
            continue
        seen.add(key)
        seq.append(p)
        if ok:
            e = estimate(key)
            assert e is not None  # a config the engine ran has an estimate
            pairs.append((e, {"output_tokens_per_s": v["tps_gpu"], "tpot_p99_ms": v["tpot_p99_ms"]}))
            if v["tpot_p99_ms"] <= sla:
                pts.append((v["tps_gpu"], v["tpot_p99_ms"]))
                if hypervolume(pts, sla) >= target:
                    break
        if len(real.trials) > 5 * budget:
            break
    return seq


def grid_sequence() -> list[dict]:
    """auto_tune's nested loops: outer parameters change slowest."""
    return [dict(zip(NAMES, combo)) for combo in itertools.product(*SPACE.values())]


def measure_duty(tmp: Path) -> dict[str, float]:
    """Duty cycle (loaded_s / wall_s over trial.json) of a real sim study: one launch per config with a
    3-level qps sweep, against the same 3 levels as separate launches (one restart per level)."""
    levels = [2, 4, 8]

    def study(name: str, qps, trials: int) -> Path:
        out = tmp / name
        text = textwrap.dedent(f"""
        name: {name}
        model: {{preset: llama-3.2-1b}}
        engines: [sim]
        hardware: {{gpu: h100, gpus: 1}}
        workload:
          dataset: {{kind: random, input_tokens: 128, output_tokens: 32, num_requests: 60}}
          scenarios:
            - {{kind: server, qps: {qps}, duration_s: 4, sla: {{ttft_p99_ms: 5000, tpot_p99_ms: 200}}}}
        objectives:
          - {{metric: output_tokens_per_s_per_gpu, scenario: server}}
        search:
          max_concurrency: [16, 64]
        sampler: {{kind: grid, seed: 0}}
        baseline: false
        budget: {{trials: {trials}, parallel: 1}}
        output_dir: {out}
        """)
        (tmp / f"{name}.yaml").write_text(text)
        subprocess.run([sys.executable, "-m", "servetune.optimizer.cli", "run", str(tmp / f"{name}.yaml"),
                        "--no-report"], check=True, capture_output=True, timeout=900)
        return out

    def duty(runs: list[Path]) -> tuple[float, float, float]:
        loaded = wall = 0.0
        for r in runs:
            for p in (r / "trials").glob("*/trial.json"):
                d = json.loads(p.read_text())
                if d.get("duplicate_of") is None:
                    loaded += d.get("loaded_s") or 0.0
                    wall += d.get("wall_s") or 0.0
        return loaded / wall if wall else float("nan"), loaded, wall

    sweep = duty([study("duty_sweep", levels, 2)])
    restart = duty([study(f"duty_qps{q}", q, 2) for q in levels])
    return {"sweep_duty": sweep[0], "sweep_loaded_s": sweep[1], "sweep_wall_s": sweep[2],
            "restart_duty": restart[0], "restart_loaded_s": restart[1], "restart_wall_s": restart[2]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--sla-tpot", type=float, default=10.0)
    ap.add_argument("--budget", type=int, default=300, help="most distinct configs a sampler may try")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "servetune_search_landscape.json")
    ap.add_argument("--duty", action="store_true", help="also measure sweep vs restart duty with real sim studies")
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    a = ap.parse_args(argv)
    table = landscape(a.cache, a.requests)
    opt_pts = [(v["tps_gpu"], v["tpot_p99_ms"]) for v in table.values() if _feasible(v, a.sla_tpot)]
    hv_opt = hypervolume(opt_pts, a.sla_tpot)
    target = 0.95 * hv_opt
    n_bad = sum(1 for v in table.values() if not v or "error" in v)
    print(f"landscape: {len(table)} configs, {n_bad} refused by the engine, {len(opt_pts)} meet p99 TPOT <= "
          f"{a.sla_tpot:g} ms; exhaustive hypervolume {hv_opt:.4g}")
    rows: dict[str, list[int | None]] = {}
    grid_n = trials_to_target(grid_sequence(), table, a.sla_tpot, target)
    rows["grid (auto_tune nested order)"] = [grid_n]
    for kind in ("random", "tpe", "nsga2"):
        rows[kind] = []
        for seed in range(a.seeds):
            seq = run_sampler(kind, seed, table, a.sla_tpot, a.budget, target)
            rows[kind].append(trials_to_target(seq, table, a.sla_tpot, target))
    print(f"\ntrials (distinct configs launched) to reach 95% of the exhaustive hypervolume; "
          f"{a.seeds} seeds, budget {a.budget}")
    print(f"{'strategy':32s} {'median':>8s} {'per seed':>30s} {'vs grid':>8s}")
    out: dict[str, Any] = {"space_size": len(table), "hv_opt": hv_opt, "grid": grid_n, "rows": {}}
    for name, vals in rows.items():
        reached = [v for v in vals if v is not None]
        med = statistics.median(v if v is not None else math.inf for v in vals)
        ratio = med / grid_n if grid_n and math.isfinite(med) else float("nan")
        shown = ",".join(str(v) if v is not None else f">{a.budget}" for v in vals)
        print(f"{name:32s} {med:>8} {shown:>30s} {ratio:>8.0%}")
        out["rows"][name] = {"per_seed": vals, "median": med if math.isfinite(med) else None,
                             "vs_grid": ratio if math.isfinite(ratio) else None, "reached": len(reached)}
    rows["tpe + prescreen 8 (estimator 15% off, calibrated)"] = [
        trials_to_target(run_prescreen(seed, table, a.sla_tpot, a.budget, target), table, a.sla_tpot, target)
        for seed in range(a.seeds)]
    for name in list(rows)[-1:]:
        vals = rows[name]
        med = statistics.median(v if v is not None else math.inf for v in vals)
        ratio = med / grid_n if grid_n and math.isfinite(med) else float("nan")
        shown = ",".join(str(v) if v is not None else f">{a.budget}" for v in vals)
        print(f"{name:32s} {med:>8} {shown:>30s} {ratio:>8.0%}")
        out["rows"][name] = {"per_seed": vals, "median": med if math.isfinite(med) else None,
                             "vs_grid": ratio if math.isfinite(ratio) else None}
    if a.duty:
        with tempfile.TemporaryDirectory() as d:
            duty = measure_duty(Path(d))
        out["duty"] = duty
        print("\nGPU duty cycle (loaded_s / wall_s, real sim studies, 2 configs x qps 2,4,8):")
        print(f"  per-launch sweep     {duty['sweep_duty']:.0%}  ({duty['sweep_loaded_s']:.1f} s loaded of "
              f"{duty['sweep_wall_s']:.1f} s)")
        print(f"  restart per level    {duty['restart_duty']:.0%}  ({duty['restart_loaded_s']:.1f} s loaded of "
              f"{duty['restart_wall_s']:.1f} s)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
