"""Multi-fidelity: the estimator pre-screens the sampler's candidates, and only the most promising is launched.

:class:`PrescreenSampler` wraps the study's sampler like any Optuna sampler wrapper: everything is delegated,
except that a trial the loop armed it for takes the configuration :class:`Prescreen` chose. The candidates are
asked of a shadow in-memory study that holds the real study's finished trials, scored by the estimator
(calibrated on this study's measurements) and told to the shadow study only: the real study never sees them.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from servetune.optimizer import fidelity, run_dir
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.sampling import make_sampler
from servetune.optimizer.scoring import Scorer, set_constraints
from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import PESSIMISTIC, STATE
from servetune.optimizer.trial_planner import TrialPlanner, config_key, dataset_args, scenario_plans


class Prescreen:
    def __init__(self, spec: StudySpec, space: SearchSpace, planner: TrialPlanner, scorer: Scorer,
                 on_note: Callable[[str], None]):
        self.spec = spec
        self.space = space
        self.planner = planner
        self.scorer = scorer
        self.on_note = on_note
        self.estimator_off: str | None = None
        self._raw: dict[int, dict[str, Any]] = {}
        # what the loop knows now: configurations measured, and those in flight (never a candidate twice)
        self.seen: dict[str, Any] = {}
        self.in_flight: list[TrialPlan] = []

    @property
    def on(self) -> bool:
        return self.spec.fidelity.prescreen > 1 and not self.estimator_off and self.spec.sampler.kind != "grid"

    def estimate(self, engine: str, params: dict[str, Any]) -> dict[str, Any]:
        return fidelity.estimate(self.planner.model.shape, self.planner.gpu_for(params)[0],
                                 {k: v for k, v in self.planner.full_params(engine, params).items() if v is not None},
                                 scenario_plans(self.spec), dataset_args(self.spec),
                                 max_requests=self.spec.fidelity.max_requests)

    def choose(self, study: optuna.Study) -> dict[str, Any] | None:
        """Score ``fidelity.prescreen`` candidates; the chosen one (``fixed``: its parameters as Optuna names
        them), or None when nothing is worth a launch (the real sampler picks)."""
        n = self.spec.fidelity.prescreen
        if not self.on:
            return None
        t0 = time.monotonic()
        cal = self.calibration()
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # seeded by the trials before the one being asked for, so each draw differs
            shadow = optuna.create_study(directions=self.scorer.directions,
                                         sampler=make_sampler(self.spec, self.space, len(self.scorer.objectives),
                                                              seed_offset=len(study.trials)))
            shadow.add_trials(finished)
        busy = {config_key(p.engine, p.params) for p in self.in_flight}
        pessimistic = self.scorer.pessimistic_values(study)
        cands: list[dict[str, Any]] = []
        for _ in range(n):
            t = shadow.ask()
            engine, params = self.space.suggest(t)
            key = config_key(engine, params)
            c: dict[str, Any] = {"engine": engine, "params": params}
            reasons = self.planner.check(engine, params)
            if reasons:
                c.update(kind="rejected", reason="; ".join(reasons))
            elif key in self.seen or key in busy or any(key == x.get("key") for x in cands):
                c.update(kind="known")
                shadow.tell(t, state=TrialState.FAIL)
                cands.append(c)
                continue
            else:
                try:
                    raw = self.estimate(engine, params)
                except fidelity.EstimateUnavailable as e:
                    self.estimator_off = str(e)
                    self.on_note(f"prescreen off: {e}")
                    return None
                if "error" in raw:
                    c.update(kind="predicted_failure", reason=raw["error"])
                else:
                    est = cal.apply_all(raw)
                    values, named, why = self.scorer.score(est, self.planner.gpus_needed(engine, params))
                    if values is None:
                        c.update(kind="unscored", reason=why)
                        shadow.tell(t, state=TrialState.FAIL)
                        cands.append(c)
                        continue
                    c.update(kind="scored", key=key, values=values, constraints=named, raw=raw, calibrated=est)
                    set_constraints(t, named)
                    shadow.tell(t, values)
                    cands.append(c)
                    continue
            set_constraints(t, self.scorer.failed_constraints())
            shadow.tell(t, pessimistic)
            cands.append(c)
        chosen = self._best(study, cands)
        if chosen is None:
            return None
        fixed = dict(chosen["params"])
        if len(self.space.engines) > 1:
            fixed["engine"] = chosen["engine"]
        summary = {"params": chosen["params"], "candidates": len(cands),
                   "kinds": {k: sum(1 for c in cands if c["kind"] == k) for k in {c["kind"] for c in cands}},
                   "values": chosen.get("values"), "constraints": chosen.get("constraints"),
                   "gain": chosen.get("gain"), "scale": cal.scale, "seconds": round(time.monotonic() - t0, 3)}
        return {"fixed": fixed, "chosen": summary, "raw": chosen.get("raw"), "calibrated": chosen.get("calibrated"),
                "candidates": [{k: v for k, v in c.items() if k not in ("raw", "calibrated", "key")}
                               for c in cands]}

    def _best(self, study: optuna.Study, cands: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Predicted-feasible candidates by hypervolume gain over the measured SLA-feasible front; else the
        least-violating scored one; else an unscored one."""
        scored = [c for c in cands if c["kind"] == "scored"]
        feasible = [c for c in scored if all(v <= 0 for v in c["constraints"].values())]
        if feasible:
            sign = [1.0 if d == "minimize" else -1.0 for d in self.scorer.directions]
            try:
                best = study.best_trials
            except Exception:  # nothing measured yet
                best = []
            front = [[v * s for v, s in zip(t.values, sign)] for t in best
                     if not t.user_attrs.get(PESSIMISTIC) and t.user_attrs.get(STATE, "complete") == "complete"]
            pts = [[v * s for v, s in zip(c["values"], sign)] for c in feasible]
            allp = np.asarray(front + pts, dtype=float)
            lo, hi = allp.min(axis=0), allp.max(axis=0)
            span = np.where(hi - lo > 0, hi - lo, np.maximum(np.abs(hi), 1.0))

            def norm(p: Sequence[float]) -> list[float]:
                return list((np.asarray(p) - lo) / span)

            ref = [1.1] * len(sign)
            nfront = [norm(f) for f in front]
            for c, p in zip(feasible, pts):
                c["gain"] = fidelity.hypervolume_gain(nfront, norm(p), ref)
            return max(feasible, key=lambda c: (c["gain"], -sum(norm([v * s for v, s in zip(c["values"], sign)]))))
        if scored:
            return min(scored, key=lambda c: sum(max(0.0, v) for v in c["constraints"].values()))
        unscored = [c for c in cands if c["kind"] == "unscored"]
        return unscored[0] if unscored else None

    @staticmethod
    def write_estimate(plan: TrialPlan, picked: dict[str, Any]) -> None:
        run_dir.write_estimate(plan.trial_dir, {"number": plan.number, "params": plan.params,
                                                **{k: v for k, v in picked.items() if k != "fixed"}})

    @staticmethod
    def record_error(tdir: Path, result: TrialResult) -> None:
        """Beside a measured trial that was pre-screened: the estimator's error, raw and as calibrated then."""
        if result.state != "complete" or result.duplicate_of is not None:
            return
        d = run_dir.read_estimate(tdir)
        if d is None:
            return
        errs: dict[str, dict[str, float]] = {"raw": {}, "calibrated": {}}
        for which in ("raw", "calibrated"):
            for label, sc in (d.get(which) or {}).items():
                meas = result.scenarios.get(label, {}).get("summary", {})
                for metric in fidelity.HEADLINE.values():
                    e, m = sc.get("summary", {}).get(metric), meas.get(metric)
                    if isinstance(e, (int, float)) and isinstance(m, (int, float)) and e > 0 and m > 0:
                        errs[which][f"{label}.{metric}"] = fidelity._rel(abs(math.log(m / e)))
        d["error_raw"], d["error_calibrated"] = errs["raw"], errs["calibrated"]
        run_dir.write_estimate(tdir, d)

    def calibration_pairs(self, base: Path) -> list[tuple[dict, dict]]:
        """(estimated, measured) scenario summaries of the completed, measured trials of the run in ``base``."""
        pairs = []
        for number, r in run_dir.trial_records(base).items():
            if r.get("state") != "complete" or r.get("duplicate_of") is not None:
                continue
            raw = self._raw.get(number)
            if raw is None:
                raw = (run_dir.read_estimate(run_dir.trial_dir(base, number)) or {}).get("raw")
                if raw is None:  # launched without a pre-screen (baseline, first trials): estimate it now
                    engine = r.get("engine") or self.space.engines[0]
                    if engine not in self.planner.engine_specs:
                        continue
                    try:
                        raw = self.estimate(engine, r.get("params") or {})
                    except fidelity.EstimateUnavailable:
                        return []
                self._raw[number] = raw
            if not raw or "error" in raw:
                continue
            for label, sc in raw.items():
                meas = (r.get("scenarios") or {}).get(label, {}).get("summary")
                if meas:
                    pairs.append((sc.get("summary", {}), meas))
        return pairs

    def calibration(self) -> fidelity.Calibration:
        if not self.spec.fidelity.calibrate:
            return fidelity.Calibration()
        return fidelity.Calibration.fit(self.calibration_pairs(self.spec.run_dir))


class PrescreenSampler(optuna.samplers.BaseSampler):
    """The study's sampler, except for a trial :meth:`arm` was called for: that one takes the configuration the
    pre-screen chose (a queued trial, a baseline or one queued again, keeps its own)."""

    def __init__(self, inner: optuna.samplers.BaseSampler, prescreen: Prescreen):
        self.inner = inner
        self.prescreen = prescreen
        self._armed = False
        self._picked: dict[int, dict[str, Any]] = {}

    def arm(self) -> None:
        self._armed = True

    def taken(self, number: int) -> dict[str, Any] | None:
        """What the pre-screen chose for trial ``number`` (None: the inner sampler's own draw)."""
        return self._picked.get(number)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        armed, self._armed = self._armed, False
        if armed and "fixed_params" not in trial.system_attrs:
            picked = self.prescreen.choose(study)
            if picked is not None:
                self._picked[trial.number] = picked
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if trial.number in self._picked:
            return {}
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if trial.number in self._picked:
            return {}
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        fixed = (self._picked.get(trial.number) or {}).get("fixed") or {}
        if param_name in fixed:
            return fixed[param_name]
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._picked.pop(trial.number, None)
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
