"""``servetune plan study.yaml``: what a run would do, before it does it.

The size of the search space, how many configurations the pre-launch rules reject and why (grouped), each
engine's baseline argv, the estimator's range for the objectives over a spread of configurations the rules
accept (the sim's roofline, uncalibrated: a guide to scale, not a result), and the expected wall time from
engine start times and the scenarios' level lengths. Nothing is launched and nothing is written.
"""
from __future__ import annotations

import math
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servetune.loadgen.scenario_kinds import ScenarioKind
from servetune.optimizer import rules
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.registry import engine_class
from servetune.optimizer.perfmodel.memory import weight_bytes
from servetune.optimizer.run_dir import trial_records

# Engine start where the study's own run has none measured: each engine's typical one (Engine.start_s), but
# a 70B took 120-293 s (docs/results/2026-11-22-*).
START_S_LARGE = (120.0, 300.0)  # models of 40 GiB of weights and more (compile and load time grow with them)
OVERHEAD_S = 30.0  # Ray's start and the report at the end (the quickstart on 2 shared cores: 30 s together)
ESTIMATES = 12  # configurations the estimator scores (0.2-0.3 s each on a laptop core)


@dataclass
class Plan:
    study: str
    engines: list[str]
    space: dict[str, Any]  # size, dimensions, exact
    rejected: dict[str, Any]  # count, of, reasons [(reason, n)]
    baselines: dict[str, dict[str, Any]]  # engine -> {argv, rejected}
    estimate: dict[str, Any] = field(default_factory=dict)
    wall: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def make_plan(spec, pf, estimates: int = ESTIMATES) -> Plan:
    """``pf``: the study's :class:`~servetune.optimizer.preflight.Preflight` (passed, with a driver)."""
    d = pf.driver
    dims = {n: (len(dim.choices) if dim.choices is not None else
                f"{dim.low:g}..{dim.high:g}{' log' if dim.log else ''}") for n, dim in d.space.dimensions.items()}
    n = len(pf.configs)
    space = {"configurations": n if pf.exact else None, "grid_points": n, "exact": pf.exact, "dimensions": dims,
             "engines": list(d.space.engines)}
    rejected = {"count": pf.n_rejected, "of": n, "reasons": pf.rejected.most_common()}
    baselines = {e: _baseline(d, e) for e in d.space.engines}
    plan = Plan(study=spec.name, engines=list(d.space.engines), space=space, rejected=rejected,
                baselines=baselines, notes=list(pf.notes))
    accepted = [(e, p) for e, p in pf.configs if not d.check(e, p)]
    plan.estimate = _estimate(d, accepted, baselines, estimates)
    plan.wall = _wall_time(spec, d, accepted, plan.estimate)
    return plan


def _baseline(d, engine: str) -> dict[str, Any]:
    params = d.space.baseline(engine)
    params.pop("engine", None)
    es = d.engine_specs[engine]
    plan = d.build_plan(0, engine, params, True, Path("trials") / "0000")
    eng = get_engine(engine, es.command, es.version)
    launch = eng.plan(params, d.model, host=d.spec.host, port=8000, gpu_ids=list(range(plan.gpus)),
                      extra_args=list(es.extra_args), extra_env=dict(es.env), gpu=d.spec.hardware.gpu,
                      gpu_memory_gib=d.spec.hardware.gpu_memory_gib)
    return {"params": params, "argv": list(launch.argv), "gpus": plan.gpus, "rejected": d.check(engine, params)}


def _spread(items: list, k: int) -> list:
    """``k`` items evenly spread over the list (deterministic: the plan of a study never changes)."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


def _estimate(d, accepted: list[tuple[str, dict]], baselines: dict[str, dict], k: int) -> dict[str, Any]:
    from servetune.optimizer import fidelity  # noqa: PLC0415 — CLI start-up time (aiohttp, through loadgen)
    from servetune.optimizer.driver import dataset_args, scenario_plans  # noqa: PLC0415 — CLI start-up time (Ray)

    out: dict[str, Any] = {"scored": 0, "predicted_failures": 0, "sla_met": 0, "objectives": {}, "baseline": {},
                           "durations": {}}
    chosen = _spread(accepted, k)
    todo = [(e, p, False) for e, p in chosen] + [(e, b["params"], True) for e, b in baselines.items()
                                                if not b["rejected"]]
    names = [f"{s}.{m}" for s, m in d.objectives]
    values: dict[str, list[float]] = {nm: [] for nm in names}
    for engine, params, is_base in todo:
        full = {k_: v for k_, v in d.full_params(engine, params).items() if v is not None}
        try:
            raw = fidelity.estimate(d.model.shape, d.spec.hardware.gpu, full, scenario_plans(d.spec),
                                    dataset_args(d.spec), max_requests=d.spec.fidelity.max_requests)
        except fidelity.EstimateUnavailable as e:
            return {"unavailable": str(e)}
        if "error" in raw:
            out["predicted_failures"] += 0 if is_base else 1
            if is_base:
                out["baseline"][engine] = {"error": raw["error"]}
            continue
        vals, named, _ = d.score(raw, rules.gpus_needed(full))
        if vals is None:
            continue
        met = all(c <= 0 for c in named.values())
        for label, sc in raw.items():
            out["durations"].setdefault(label, []).append(sc["summary"])
        if is_base:
            out["baseline"][engine] = {"values": dict(zip(names, vals)), "sla_met": met}
            continue
        out["scored"] += 1
        out["sla_met"] += met
        for nm, v in zip(names, vals):
            if math.isfinite(v):
                values[nm].append(v)
    out["objectives"] = {nm: {"low": min(v), "high": max(v)} for nm, v in values.items() if v}
    out["of"] = len(accepted)
    return out


def _scenario_seconds(sc, est: list[dict[str, Any]], n_data: int) -> tuple[float, float]:
    """(shortest, longest) measured time of one scenario in one trial."""
    s = sc.settings
    kind = ScenarioKind.get(s["kind"])
    if kind.drive == "all_at_once":
        n = int(s.get("num_requests") or n_data)
        rates = [r for x in est if (r := x.get("requests_per_s"))]
        if not rates:
            return (0.0, 0.0)
        return (n / max(rates), n / min(rates))
    if kind.drive == "one_at_a_time":
        n = int(s.get("num_requests") or n_data)
        e2e = [t for x in est if (t := x.get("e2e_mean_ms"))]
        return (n * min(e2e) / 1000, n * max(e2e) / 1000) if e2e else (0.0, 0.0)
    key = kind.rate_key or "qps"
    levels = s.get(key)
    levels = levels if isinstance(levels, list) else [levels]
    dur = float(s.get("duration_s") or 0.0)

    def level_s(rate: float | None) -> float:
        if key == "qps" and rate:
            n = s.get("num_requests") or (0 if dur else n_data)
            return max(dur, n / rate)
        return dur or 30.0

    if sc.max_qps:
        m = sc.max_qps
        one = max(dur, 1.0)
        longest = float(m.get("max_level_duration_s") or 3 * one)
        return (2 * one, (m["max_levels"] - 1) * one + longest)
    per = [level_s(r) for r in levels]
    return (per[0], sum(per))


def _wall_time(spec, d, accepted: list[tuple[str, dict]], est: dict[str, Any]) -> dict[str, Any]:
    from servetune.optimizer.driver import dataset_args, scenario_plans  # noqa: PLC0415 — CLI start-up time (Ray)

    n_data = int(dataset_args(spec).get("n") or 200)
    durations = est.get("durations") or {}
    measured = [r["ready_s"] for r in trial_records(spec.run_dir).values() if r.get("ready_s")]
    if measured:
        start = (min(measured), statistics.median(measured))
        start_from = f"measured in {spec.run_dir} ({len(measured)} starts)"
    else:
        lo, hi = 0.0, 0.0
        for e in d.space.engines:
            s = engine_class(e).start_s
            if not engine_class(e).simulated and (weight_bytes(d.model.shape, None) or 0) >= 40 * 1024**3:
                s = START_S_LARGE
            lo, hi = max(lo, s[0]), max(hi, s[1])
        start, start_from = (lo, hi), "typical, docs/results"
    stop = max(engine_class(e).stop_s for e in d.space.engines)
    per_scenario = {sc.label: _scenario_seconds(sc, durations.get(sc.label, []), n_data) for sc in scenario_plans(spec)}
    trial = (start[0] + stop + sum(a for a, _ in per_scenario.values()),
             start[1] + stop + sum(b for _, b in per_scenario.values()))
    gpus = [rules.gpus_needed(d.full_params(e, p)) for e, p in accepted] or [1]
    # trials at once: the GPUs over what an average accepted configuration takes (the sampler may favour the
    # widest ones instead: the upper bound), within budget.parallel
    at_once = max(1.0, min(float(spec.budget.parallel), spec.hardware.gpus / statistics.mean(gpus)))
    fewest = max(1, min(spec.budget.parallel, spec.hardware.gpus // max(gpus)))
    n = max(spec.budget.trials, len(d.space.engines) if spec.baseline else 0)
    rounds = (math.ceil(n / at_once), math.ceil(n / fewest))
    study = (OVERHEAD_S + rounds[0] * trial[0], OVERHEAD_S + rounds[1] * trial[1])
    capped = spec.budget.wall_time_s
    if capped:
        study = (min(study[0], capped + trial[1]), min(study[1], capped + trial[1]))
    return {"start_s": start, "start_from": start_from, "stop_s": stop, "scenarios": per_scenario,
            "trial_s": trial, "at_once": (at_once, fewest), "rounds": rounds, "study_s": study, "wall_time_s": capped,
            "repeats": spec.budget.repeats}


# -- text -----------------------------------------------------------------------------------------------------

def _dur(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _span(pair, fmt: str = "d") -> str:
    a, b = pair
    return format(a, fmt) if a == b else f"{format(a, fmt)}–{format(b, fmt)}"


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def lines(spec, plan: Plan) -> list[str]:
    """The plan as text lines (rich markup-free)."""
    out = []
    hw = spec.hardware
    out.append(f"study {plan.study}: {', '.join(plan.engines)}; {hw.gpus}× {hw.gpu}; "
               f"{spec.budget.trials} trials, {spec.budget.parallel} at a time; sampler {spec.sampler.kind}")
    sp = plan.space
    dims = " × ".join(f"{n} {v}" for n, v in sp["dimensions"].items()) or "(the catalog's defaults)"
    engines = f" × {len(sp['engines'])} engines" if len(sp["engines"]) > 1 else ""
    if sp["exact"]:
        out.append(f"space: {sp['configurations']:,} configurations ({dims}{engines})")
    elif sp["grid_points"]:
        out.append(f"space: continuous ({dims}{engines}); the rules and the estimate below use "
                   f"{sp['grid_points']:,} grid points, ranges at 4 points")
    else:
        out.append(f"space: too large to enumerate ({dims}{engines})")
    rj = plan.rejected
    if rj["of"]:
        out.append(f"rules: {rj['count']:,} of {rj['of']:,} rejected before launch"
                   + (" (no GPU time is spent on them):" if rj["count"] else ""))
        for why, n in rj["reasons"][:8]:
            out.append(f"  {n:>5,} × {why}")
        if len(rj["reasons"]) > 8:
            out.append(f"  ... and {len(rj['reasons']) - 8} other reasons")
    for engine, b in plan.baselines.items():
        if not spec.baseline:
            break
        tag = f" — rejected: {'; '.join(b['rejected'])}" if b["rejected"] else ""
        out.append(f"baseline ({engine}, {b['gpus']} GPU(s)): {shlex.join(b['argv'])}{tag}")
    est = plan.estimate
    if est.get("unavailable"):
        out.append(f"estimate: unavailable ({est['unavailable']})")
    elif est.get("scored"):
        out.append(f"estimate (sim roofline, uncalibrated; {est['scored']} of {est['of']:,} accepted "
                   f"configurations, spread over the space):")
        dirs = {f"{o.scenario or spec.workload.scenarios[0].label}.{o.metric}": o.direction for o in spec.objectives}
        for nm, r in est["objectives"].items():
            base = "; ".join(f"baseline{'' if len(plan.engines) == 1 else ' ' + e} {_num(b['values'][nm])}"
                             for e, b in est["baseline"].items() if "values" in b)
            out.append(f"  {nm} ({dirs.get(nm, '')}): {_num(r['low'])} – {_num(r['high'])}"
                       + (f"  ({base})" if base else ""))
        if est["predicted_failures"]:
            out.append(f"  {est['predicted_failures']} of them predicted to fail at start-up")
        out.append(f"  SLA met (estimated): {est['sla_met']} of {est['scored']}")
    w = plan.wall
    if w:
        scen = ", ".join(f"{label} {_dur(a)}" + (f"–{_dur(b)}" if b > a * 1.05 else "")
                         for label, (a, b) in w["scenarios"].items())
        lo, hi = w["study_s"]
        out.append(f"wall time: about {_dur(lo)}" + (f" – {_dur(hi)}" if hi > lo * 1.05 else "")
                   + f" ({_span(w['rounds'])} rounds of {_span(w['at_once'][::-1], '.3g')} trial(s) at once; "
                   + f"a trial {_dur(w['trial_s'][0])}"
                   + (f"–{_dur(w['trial_s'][1])}" if w["trial_s"][1] > w["trial_s"][0] * 1.05 else "")
                   + f": engine start {_dur(w['start_s'][0])}–{_dur(w['start_s'][1])} ({w['start_from']}), {scen})"
                   + (f"; budget.wall_time_s stops new trials after {_dur(w['wall_time_s'])}"
                      if w["wall_time_s"] else "")
                   + (f"; then {w['repeats']} repeat(s) of the Pareto candidates" if w["repeats"] else ""))
    out += [f"note: {n}" for n in plan.notes]
    return out
