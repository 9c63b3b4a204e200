"""Telling Optuna what a trial came to: values and SLA constraints, a failure the samplers learn from, a
duplicate that takes an earlier measurement, and a quality verdict that waits for its engine's baseline.

Every told trial's record is written to the run directory and stored with the trial (``RECORD``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from servetune.optimizer import quality as q
from servetune.optimizer import run_dir
from servetune.optimizer.prescreen import Prescreen
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.scoring import Scorer, set_constraints
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import (
    BASELINE,
    CONSTRAINTS,
    ENGINE,
    FAILURE,
    OBJECTIVES,
    PESSIMISTIC,
    RECORD,
    STATE,
    StudyStore,
)
from servetune.optimizer.summary import StudyOutcome
from servetune.optimizer.trial_planner import TrialPlanner


class Teller:
    def __init__(self, spec: StudySpec, store: StudyStore, scorer: Scorer, planner: TrialPlanner,
                 quality: q.QualityGate | None, on_event: Callable[[str, dict[str, Any]], None]):
        self.spec = spec
        self.store = store
        self.scorer = scorer
        self.planner = planner
        self.quality = quality
        self.on_event = on_event
        self.base = spec.run_dir
        # measured trials whose quality verdict waits for their engine's baseline evaluation (told after it)
        self.deferred: list[tuple[optuna.Trial, TrialResult, StudyOutcome]] = []
        self.ending = False  # no trial is launched any more: deferred verdicts are given with what there is

    def tdir(self, number: int) -> Path:
        return run_dir.trial_dir(self.base, number)

    def tell(self, trial: optuna.Trial, result: TrialResult, outcome: StudyOutcome) -> bool:
        """Tell the trial's result; True when it was measured (values told, or its verdict deferred)."""
        study = self.store.study
        values: list[float] | None = None
        named: dict[str, float] = {}
        if result.state == "complete":
            values, named, why = self.scorer.score(result.scenarios, result.gpus)
            contaminated = values is None and any(sr.get("contaminated") for sr in result.scenarios.values())
            # a contaminated measurement stays complete, as measured and flagged; Optuna is told it failed and
            # learns nothing from it (it measured the engine warming up or replayed prompts, not the config)
            if values is None and not contaminated:
                result.state = "failed"
                result.failure = {"kind": "load_errors", "reason": why}
            else:
                if values is not None:
                    self.scorer.put_objectives(result, values)
                # a contaminated launch still answered the evaluation set: its quality figures stand (and a
                # contaminated baseline is still the reference of the others)
                if self.quality is not None:
                    if self._awaits_reference(result):
                        self.deferred.append((trial, result, outcome))
                        self.on_event("note", {"text": f"trial {result.number} is measured; its quality verdict "
                                                       "waits for its engine's baseline evaluation"})
                        return values is not None
                    result.quality = self._judge_quality(result)
                    if "quality" in named:
                        named["quality"] = float(result.quality["constraint"])
        trial.set_user_attr(STATE, result.state)
        run_dir.write_record(self.tdir(result.number), result)
        trial.set_user_attr(RECORD, result.to_dict())
        Prescreen.record_error(self.tdir(result.number), result)
        if values is not None:
            trial.set_user_attr(CONSTRAINTS, list(named.values()))
            trial.set_user_attr(OBJECTIVES, result.objectives)
            set_constraints(trial, named)
            study.tell(trial, values)
        else:
            trial.set_user_attr(FAILURE, result.failure)
            if self.learns_from(result):
                # An infeasible COMPLETE with pessimistic values: the samplers model the failed region (TPE puts
                # it in the "bad" group, GP fits the constraint, NSGA-II ranks it last) and best_trials, hence
                # the Pareto front, never contains it.
                trial.set_user_attr(PESSIMISTIC, True)
                set_constraints(trial, self.scorer.failed_constraints())
                study.tell(trial, self.scorer.pessimistic_values(study))
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        outcome.results.append(result)
        self.on_event("result", {"result": result, "constraints": list(named.values())})
        if result.is_baseline and self.deferred:
            self.flush(result.engine)
        return values is not None

    def tell_duplicate(self, trial: optuna.Trial, plan: TrialPlan, prev: TrialResult, outcome: StudyOutcome) -> None:
        """Same config as an earlier trial: reuse its measurement instead of paying for a relaunch."""
        result = TrialResult.from_dict({**prev.to_dict(), "number": plan.number, "is_baseline": plan.is_baseline,
                                        "duplicate_of": prev.number, "objectives": {}})
        if result.state != "complete" and result.failure:
            result.failure = {**result.failure,
                              "reason": f"same config as trial {prev.number}: " + result.failure["reason"]}
        self.tell(trial, result, outcome)

    def reject(self, trial: optuna.Trial, plan: TrialPlan, reasons: list[str], outcome: StudyOutcome) -> None:
        """A configuration the rules refuse: told without a launch."""
        self.tell(trial, TrialResult(number=plan.number, engine=plan.engine, params=plan.params, state="rejected",
                                     is_baseline=plan.is_baseline, gpus=plan.gpus,
                                     failure={"kind": "rejected", "reason": "; ".join(reasons)}), outcome)

    def learns_from(self, result: TrialResult) -> bool:
        """Failures that say something about the configuration (not the driver, Ray or a busy GPU)."""
        kind = (result.failure or {}).get("kind")
        return self.spec.sampler.learn_from_failures and result.state in ("failed", "rejected") \
            and kind not in (None, "internal")

    # quality: the verdict needs the engine's baseline evaluation --------------------------------------------
    def _awaits_reference(self, result: TrialResult) -> bool:
        """A measured trial whose engine's baseline is still to be measured (queued or running): its verdict,
        hence its tell, waits for that baseline (a baseline is its own reference)."""
        if result.is_baseline or self.ending:
            return False
        if q.reference_trial(run_dir.trial_records(self.base), result.engine) is not None:
            return False
        engines = self.planner.space.engines
        return any(t.user_attrs.get(BASELINE) and (t.user_attrs.get(ENGINE) or engines[0]) == result.engine
                   for t in self.store.trials(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))

    def _judge_quality(self, result: TrialResult) -> dict[str, Any]:
        assert self.quality is not None
        engine = result.engine
        full = self.planner.full_params
        measured = result.duplicate_of if result.duplicate_of is not None else result.number
        own = q.load_eval(self.tdir(measured))
        base = full(engine, {k: v for k, v in self.planner.space.baseline(engine).items() if k != "engine"})
        ref = q.reference_trial(run_dir.trial_records(self.base), engine, lambda r: not q.numerics_changes(
            full(engine, r.get("params") or {}), base))
        reference = None if ref is None else (ref[0], own if ref[1] == measured else q.load_eval(self.tdir(ref[1])))
        changes = q.numerics_changes(full(engine, result.params), base)
        return self.quality.judge(result.quality, own, reference, changes,
                                  is_reference=result.is_baseline or (ref is not None and ref[0] == result.number))

    def flush(self, engine: str | None = None) -> None:
        """Tell the deferred trials of ``engine`` (None: all, judged with what there is: the study is ending)."""
        waiting, self.deferred = self.deferred, []
        self.ending = self.ending or engine is None
        for trial, result, outcome in waiting:
            if engine is None or result.engine == engine:
                self.tell(trial, result, outcome)
            else:
                self.deferred.append((trial, result, outcome))
