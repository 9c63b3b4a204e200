"""Noise: re-measure the top Pareto candidates, then mean ± 95 % CI per objective and the noise-aware front.

Each repeat is a fresh launch in ``trials/NNNN/repeat_K/``; a finished repeat is kept when the study resumes.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from servetune.optimizer import noise, run_dir
from servetune.optimizer.in_flight import InFlight
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.scoring import Scorer
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import PESSIMISTIC, STATE
from servetune.optimizer.summary import pareto_numbers
from servetune.optimizer.trial_executor import TrialExecutor
from servetune.optimizer.trial_planner import TrialPlanner


def _measured(base: Path, number: int) -> int:
    """The trial that ran for ``number`` (a duplicate points at it)."""
    d = run_dir.read_record(run_dir.trial_dir(base, number)) or {}
    return d["duplicate_of"] if d.get("duplicate_of") is not None else number


def repeat(spec: StudySpec, study: optuna.Study, executor: TrialExecutor, planner: TrialPlanner, scorer: Scorer,
           mask: Callable[[Path], None], on_event: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
    b = spec.budget
    base = spec.run_dir
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    measured: dict[int, int] = {}  # the measured trial behind each front point
    for n in pareto_numbers(study):
        if run_dir.read_record(run_dir.trial_dir(base, n)) is not None:
            measured.setdefault(_measured(base, n), n)
    sign = -1 if spec.objectives[0].direction == "maximize" else 1
    chosen = sorted(measured, key=lambda n: by_number[measured[n]].values[0] * sign)[:b.repeat_top]
    runs: dict[int, list[TrialResult]] = {n: [] for n in chosen}
    originals: dict[int, TrialResult] = {}
    todo: list[TrialPlan] = []
    for n in chosen:
        orig = run_dir.read_result(run_dir.trial_dir(base, n))
        if orig is None:
            raise FileNotFoundError(f"{run_dir.trial_dir(base, n)}: the Pareto trial's record is unreadable")
        originals[n] = orig
        for k in range(1, b.repeats + 1):
            rdir = run_dir.repeat_dir(base, n, k)
            prev = run_dir.read_result(rdir)
            if prev is not None and prev.state == "complete":
                runs[n].append(prev)
                continue
            plan = planner.build_plan(n, orig.engine, orig.params, orig.is_baseline, rdir)
            plan.quality = None  # a repeat re-measures speed; the outputs were judged on the first launch
            todo.append(plan)
    flight: InFlight[None] = InFlight(executor, mask, lambda plans: on_event("tick", {"in_flight": plans}))
    while todo or len(flight):
        while todo and len(flight) < b.parallel:
            plan = todo.pop(0)
            flight.submit(plan, None)
            on_event("repeat", {"number": plan.number, "trial_dir": plan.trial_dir})
        for done in flight.wait():
            r = done.result
            if r is not None and r.state == "complete":
                scorer.score(r.scenarios, r.gpus)
                run_dir.write_record(done.plan.trial_dir, r)
                runs[done.plan.number].append(r)
    names = scorer.names
    stats: dict[int, dict[str, dict[str, Any]]] = {}
    for n in chosen:
        samples = [originals[n]] + runs[n]
        stats[n] = {}
        for (label, metric), name in zip(scorer.objectives, names):
            vals = [r.scenarios.get(label, {}).get("summary", {}).get(metric) for r in samples]
            stats[n][name] = noise.mean_ci([v for v in vals if isinstance(v, (int, float))])
    # noise-aware front over every SLA-feasible measured trial: repeated ones by their own CI, the rest by the
    # pooled relative CI of the repeated ones
    points: dict[int, list[float]] = {}
    nz: dict[int, list[float]] = {}
    pooled = [noise.pooled_relative_ci(stats, name) for name in names]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get(PESSIMISTIC) or any(v > 0 for v in t.constraints.values()):
            continue
        if t.user_attrs.get(STATE, "complete") != "complete":
            continue
        src = _measured(base, t.number)
        if src in points:
            continue
        if src in stats:
            points[src] = [stats[src][nm]["mean"] for nm in names]
            nz[src] = [stats[src][nm]["ci"] or 0.0 for nm in names]
        else:
            points[src] = list(t.values)
            nz[src] = [abs(v) * (p or 0.0) for v, p in zip(t.values, pooled)]
    return {"repeats": b.repeats, "trials": {str(n): st for n, st in stats.items()},
            "pareto_noise_aware": noise.noise_aware_front(points, nz, scorer.directions)}
