"""Objective values and SLA constraints from scenario summaries, measured or estimated, as Optuna takes them.

A constraint is <= 0 when met. Every trial carries the same constraints in the same order (GP needs as many for
each trial); a failure told as a result carries the worst measured value of each objective (``pessimistic``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import optuna

from servetune.loadgen.sla import LIMITS, limit_excess
from servetune.optimizer.records import TrialResult
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import PESSIMISTIC
from servetune.optimizer.trial_planner import judges_steady_state, scenario_plans

Direction = Literal["maximize", "minimize"]


def objective_keys(spec: StudySpec) -> list[tuple[str, str]]:
    return spec.objective_keys()


def set_constraints(trial: optuna.Trial, named: dict[str, float]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already set": a trial re-told after a driver restart
        for name, v in named.items():
            trial.set_constraint(name, float(v) if math.isfinite(v) else 1e6)


class Scorer:
    def __init__(self, spec: StudySpec, quality_constrains: bool):
        self.spec = spec
        self.objectives = objective_keys(spec)
        self.names = [f"{s}.{m}" for s, m in self.objectives]
        # (the spec fills in each objective's natural direction; "or" only tells the type checker so)
        self.directions: list[Direction] = [o.direction or "maximize" for o in spec.objectives]
        self.quality_constrains = quality_constrains

    def constraint_names(self) -> list[str]:
        """Every trial carries the same constraints, in this order (GP needs as many for each trial)."""
        names = []
        for sc in scenario_plans(self.spec):  # read anew: the spec's SLA is the one in force
            names += [f"{sc.label}.{short}" for short, limit_key, _ in LIMITS if sc.settings.get(limit_key)]
            if judges_steady_state(sc):
                names.append(f"{sc.label}.steady")
        if self.quality_constrains:
            names.append("quality")
        return names + ["failed"]

    def failed_constraints(self) -> dict[str, float]:
        return {n: 1.0 for n in self.constraint_names()}

    def score(self, scenarios: dict[str, dict[str, Any]], gpus: int
              ) -> tuple[list[float] | None, dict[str, float], str]:
        """Objective values and named constraints (<= 0: met) from scenario summaries, measured or estimated.
        Adds the derived metrics and each scenario's ``sla_met`` in place."""
        for sr in scenarios.values():
            self.derived_metrics(sr, gpus)
        values = []
        for label, metric in self.objectives:
            v = scenarios.get(label, {}).get("summary", {}).get(metric)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                return None, {}, f"objective {label}.{metric} was not measured"
            values.append(float(v))
        constraints: dict[str, float] = {}
        for sc in scenario_plans(self.spec):  # read anew: the spec's SLA is the one in force
            summ = scenarios.get(sc.label, {}).get("summary", {})
            excess = limit_excess(summ, sc.settings)
            constraints.update({f"{sc.label}.{short}": c for short, c in excess.items()})
            mine = list(excess.values())
            if judges_steady_state(sc):
                # the keep-up rule (loadgen.validity): p99 within limits at a rate the server cannot sustain is
                # no SLA met; estimates carry no verdict and count as met
                c = 0.0 if summ.get("steady_state_met", 1.0) else 1.0
                constraints[f"{sc.label}.steady"] = c
                mine.append(c)
            if mine and sc.label in scenarios:
                scenarios[sc.label]["sla_met"] = all(c <= 0 for c in mine)
        dirty = [label for label, sr in scenarios.items() if sr.get("contaminated")]
        for label in dirty:
            # its reported level failed the engine-side audit twice (loadgen.audit): neither met nor missed
            scenarios[label]["sla_met"] = None
        if dirty:
            return None, {}, f"contaminated measurement in {', '.join(dirty)}: the audit failed after a re-run"
        if self.quality_constrains:
            constraints["quality"] = 0.0  # an estimate cannot judge outputs; the teller puts the measured verdict here
        constraints["failed"] = 0.0
        return values, constraints, ""

    def values_and_constraints(self, result: TrialResult) -> tuple[list[float] | None, list[float], str]:
        values, named, why = self.score(result.scenarios, result.gpus)
        if values is not None:
            self.put_objectives(result, values)
        return values, list(named.values()), why

    def put_objectives(self, result: TrialResult, values: list[float]) -> None:
        for name, v in zip(self.names, values):
            result.objectives[name] = float(v)

    def derived_metrics(self, sr: dict[str, Any], gpus: int) -> None:
        summ = sr.setdefault("summary", {})
        tps = summ.get("output_tokens_per_s")
        if tps and "output_tokens_per_s_per_gpu" not in summ:
            summ["output_tokens_per_s_per_gpu"] = tps / max(gpus, 1)
        if tps and self.spec.cost_per_gpu_hour is not None:
            summ["usd_per_million_tokens"] = self.spec.cost_per_gpu_hour * gpus / (tps * 3600) * 1e6

    def pessimistic_values(self, study: optuna.Study) -> list[float]:
        """Each objective's worst measured value (or a neutral floor before anything was measured)."""
        measured = [t.values for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if t.values and not t.user_attrs.get(PESSIMISTIC)]
        out = []
        for i, direction in enumerate(self.directions):
            col = [v[i] for v in measured if math.isfinite(v[i])]
            if direction == "maximize":
                out.append(min(col) if col else 0.0)
            else:
                out.append(max(col) if col else 1e6)
        return out
