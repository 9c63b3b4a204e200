"""The study loop: ask Optuna, reject or plan, run on Ray, tell Optuna. Resumable at any point.

Data flows one way: StudySpec → SearchSpace → (ask) → TrialPlan → Ray task → TrialResult → (tell) → storage
and ``trials/NNNN/trial.json``. Optuna's storage is the source of truth for what has run; rerunning the same
command continues the study, re-queues trials a dead driver left RUNNING and reaps their engine processes.

The parts, each in its own module: planning (trial_planner), scoring (scoring), the sampler (sampling) and its
pre-screen (prescreen), telling Optuna (teller), stale trials (recovery, study_store), trials in flight
(in_flight), repeats (repeats), the summary (summary) and the run directory's files (run_dir).
"""
from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from servetune.optimizer import interrupts, repeats, resume_check, run_dir
from servetune.optimizer.cluster_execution import ClusterExecutor, TrialLost
from servetune.optimizer.engines import simulated
from servetune.optimizer.execution import RayExecutor
from servetune.optimizer.in_flight import Done, InFlight, worker_died
from servetune.optimizer.prescreen import Prescreen, PrescreenSampler
from servetune.optimizer.quality import NUMERICS, QualityGate
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.recovery import Foreign, Recovery
from servetune.optimizer.run_dir import StudyLocked
from servetune.optimizer.sampling import grid_done, make_sampler
from servetune.optimizer.scoring import Scorer
from servetune.optimizer.shared_study import ConfigClaims, restore_records
from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import (
    BASELINE,
    ENGINE,
    ESTIMATE,
    KEY,
    PESSIMISTIC,
    STALE,
    STATE,
    StudyStore,
)
from servetune.optimizer.summary import StudyOutcome, write_summary
from servetune.optimizer.teller import Teller
from servetune.optimizer.trial_executor import TrialExecutor
from servetune.optimizer.trial_planner import TrialPlanner, config_key, dataset_args, resolve_model, scenario_plans

# the names tests and the other commands import from here
__all__ = ["StudyDriver", "StudyLocked", "StudyOutcome", "config_key", "dataset_args", "make_sampler",
           "resolve_model", "scenario_plans", "unchecked_numerics", "BASELINE", "KEY", "PESSIMISTIC", "STALE"]

# Rejected configurations cost no GPU time and do not count against budget.trials; a search space the rules
# mostly reject still ends after this many rejections per trial of the budget.
REJECTIONS_PER_TRIAL = 10

Parked = dict[str, list[tuple[optuna.Trial, TrialPlan]]]


def unchecked_numerics(spec: StudySpec, space: SearchSpace) -> list[str]:
    """Searched parameters that change the model's outputs, when no trial's outputs are checked: only those
    the search really moves (more than one value), and only when more than one trial compares them."""
    if spec.quality is not None or spec.budget.trials < 2:
        return []
    return [n for n, d in space.dimensions.items() if n in NUMERICS and not d.fixed]


class StudyDriver:
    def __init__(self, spec: StudySpec, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 ray_address: str | None = None):
        self.spec = spec
        self.run_dir = spec.run_dir
        self.on_event = on_event or (lambda kind, data: None)
        self.ray_address = ray_address
        self.space = SearchSpace([e.name for e in spec.engines], spec.search,
                                 {e.name: e.version for e in spec.engines},
                                 gpu_types=[t.gpu for t in spec.cluster.node_types])
        self.model = resolve_model(spec)
        self.quality = None
        if spec.quality is not None:
            base = str(Path(spec.source).resolve().parent) if spec.source else None
            self.quality = QualityGate(spec.quality, drift=spec.model.load_format == "dummy", base_dir=base)
        self.planner = TrialPlanner(spec, self.space, self.model,
                                    self.quality.trial_settings() if self.quality else None)
        self.scorer = Scorer(spec, self.quality is not None and self.quality.constrains)
        self.prescreen = Prescreen(spec, self.space, self.planner, self.scorer,
                                   lambda text: self.on_event("note", {"text": text}))
        self.objectives = self.scorer.objectives
        self.engine_specs = self.planner.engine_specs
        # set by open_study
        self._store: StudyStore | None = None
        self.sampler: PrescreenSampler | None = None
        self._teller: Teller | None = None
        self._recovery: Recovery | None = None

    # what a configuration is, and would do (tests, preflight and `servetune plan` use these) ---------------
    def trial_dir(self, number: int) -> Path:
        return run_dir.trial_dir(self.run_dir, number)

    def plan_trial(self, trial: optuna.Trial) -> tuple[TrialPlan, list[str]]:
        engine, params = self.planner.sampled(trial)
        plan = self.planner.build_plan(trial.number, engine, params, bool(trial.user_attrs.get(BASELINE)),
                                       self.trial_dir(trial.number))
        return plan, self.planner.check(engine, params)

    def full_params(self, engine: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.planner.full_params(engine, params)

    def check(self, engine: str, params: dict[str, Any]) -> list[str]:
        return self.planner.check(engine, params)

    def gpu_for(self, params: dict[str, Any]) -> tuple[str, float, float | None, int]:
        return self.planner.gpu_for(params)

    def build_plan(self, number: int, engine: str, params: dict[str, Any], is_baseline: bool,
                   trial_dir: Path) -> TrialPlan:
        return self.planner.build_plan(number, engine, params, is_baseline, trial_dir)

    def score(self, scenarios: dict[str, dict[str, Any]], gpus: int
              ) -> tuple[list[float] | None, dict[str, float], str]:
        return self.scorer.score(scenarios, gpus)

    def constraint_names(self) -> list[str]:
        return self.scorer.constraint_names()

    # the study in storage -----------------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        inner = make_sampler(self.spec, self.space, len(self.spec.objectives))
        self.sampler = PrescreenSampler(inner, self.prescreen)
        self._store = StudyStore(self.spec.storage_url, self.spec.name, self.scorer.directions, self.sampler)
        self._teller = Teller(self.spec, self._store, self.scorer, self.planner, self.quality, self.on_event)
        self._recovery = Recovery(self.spec, self._store, self._teller, self.on_event)
        return self.store.study

    @property
    def store(self) -> StudyStore:
        assert self._store is not None, "open_study() first"
        return self._store

    @property
    def teller(self) -> Teller:
        assert self._teller is not None, "open_study() first"
        return self._teller

    @property
    def recovery(self) -> Recovery:
        assert self._recovery is not None, "open_study() first"
        return self._recovery

    def tell(self, trial: optuna.Trial, result: TrialResult, outcome: StudyOutcome | None = None) -> bool:
        """Tell a trial's result as the loop would (values, constraints, failure learning, its record)."""
        return self.teller.tell(trial, result, outcome or StudyOutcome(self.run_dir))

    def recover(self, study: optuna.Study, exclusive: bool) -> int:
        """Trials left RUNNING by a dead driver: reap their engines, fail them as stale, queue them again."""
        return self.recovery.recover(exclusive)

    # the run ---------------------------------------------------------------------------------------------------
    def run(self) -> StudyOutcome:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = run_dir.lock(self.run_dir)
        executor = None
        session = None
        try:
            changed = resume_check.compare(self.spec)
            if changed.refused:  # before the stored file is replaced and before Optuna is asked anything
                raise resume_check.StudyChanged(changed.refusal(self.spec.source))
            if self.spec.source and Path(self.spec.source).exists():
                shutil.copyfile(self.spec.source, run_dir.study_file(self.run_dir))
            exclusive = self.spec.storage is None  # our own SQLite file under our lock: RUNNING means stale
            study = self.open_study()
            resume_check.check_distributions(study, self.space)
            session = run_dir.open_session(self.run_dir)  # GPU use counts the time drivers ran, not the gaps
            if not exclusive:
                self.recovery.claims = ConfigClaims(self.store.engine, self.spec.name)
            requeued = self.recovery.recover(exclusive)
            if requeued:
                self.on_event("resumed", {"requeued": requeued})
            self._restore_records(study)
            counted = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(STALE)
                       and t.user_attrs.get(STATE) != "rejected"]  # the budget counts what was measured
            if self.spec.baseline and not any(t.user_attrs.get(BASELINE) for t in study.get_trials(deepcopy=False)):
                for e in self.space.engines:
                    study.enqueue_trial({}, user_attrs={BASELINE: True, ENGINE: e})
            done_before = sum(1 for t in counted if t.state.is_finished())
            self.on_event("start", {"done": done_before, "budget": self.spec.budget.trials,
                                    "run_dir": str(self.run_dir)})
            lossy = unchecked_numerics(self.spec, self.space)
            if lossy:
                self.on_event("note", {"text": f"the search changes numerics ({', '.join(lossy)}) and the study has "
                                               "no quality: section, so no trial's outputs are checked "
                                               "(docs/quality.md)"})
            executor = self._executor()
            if self.recovery.stale_dirs:
                executor.reap_everywhere(self.recovery.stale_dirs)  # a dead driver's engines, on whichever node
            outcome = self._loop(study, executor, done_before)
            noise = None
            if self.spec.budget.repeats:
                noise = repeats.repeat(self.spec, study, executor, self.planner, self.scorer,
                                       self.recovery.mask_secrets, self.on_event)
            self._restore_records(study)  # what other drivers of a shared study measured meanwhile
            fidelity = None
            if self.spec.fidelity.prescreen > 1:
                fidelity = {"estimator_off": self.prescreen.estimator_off,
                            "pairs": self.prescreen.calibration_pairs(self.run_dir)}
            write_summary(self.spec, study, outcome, objectives=self.objectives, quality=self.quality,
                          fidelity=fidelity, repeats=noise)
            return outcome
        except KeyboardInterrupt:  # say so now: stopping a 70B engine takes a while
            interrupts.clear()
            self.on_event("interrupted", {})
            raise
        finally:
            if executor is not None:
                executor.shutdown()
            if session is not None:
                run_dir.close_session(self.run_dir, session)
            lock.close()

    def _restore_records(self, study: optuna.Study) -> None:
        n = restore_records(study, self.trial_dir)
        if n:
            self.on_event("note", {"text": f"{n} trial record(s) this run directory lacked were restored from the "
                                           "study's storage (their per-request files stay where they ran)"})

    def _executor(self) -> TrialExecutor:
        address = self.ray_address or self.spec.cluster.address
        if address:
            return ClusterExecutor(self.spec, address, model_path=self.model.path if self.spec.model.path else None,
                                   on_note=lambda text: self.on_event("note", {"text": text}))
        all_sim = all(simulated(e) for e in self.space.engines)
        return RayExecutor(self.spec.hardware.gpus, address=self.ray_address,
                           declare_gpus=all_sim or self.ray_address is None, run_dir=self.run_dir)

    def _loop(self, study: optuna.Study, executor: TrialExecutor, done_before: int) -> StudyOutcome:
        b = self.spec.budget
        store, teller, recovery = self.store, self.teller, self.recovery
        deadline = time.monotonic() + b.wall_time_s if b.wall_time_s else math.inf
        outcome = StudyOutcome(run_dir=self.run_dir)
        flight: InFlight[optuna.Trial] = InFlight(executor, recovery.mask_secrets,
                                                  lambda plans: self.on_event("tick", {"in_flight": plans}))
        started = done_before
        trials = study.get_trials(deepcopy=False)
        rejected = sum(1 for t in trials if t.user_attrs.get(STATE) == "rejected")
        failures = sum(1 for t in trials
                       if t.state.is_finished() and not t.user_attrs.get(STALE)
                       and t.user_attrs.get(STATE) != "rejected"
                       and (t.state == optuna.trial.TrialState.FAIL or t.user_attrs.get(PESSIMISTIC)))
        seen = recovery.seen_configs()
        # a config sampled while the same one is being measured waits for that result instead of a second GPU
        parked: Parked = {}
        # shared storage: a config another driver claimed waits for that driver's result (trial, plan, key)
        foreign: Foreign = []
        withdrawn: set[Any] | None = None  # at the wall time: the trials still queued in Ray, never launched
        last_beat = last_foreign = 0.0
        inner = self.sampler.inner if self.sampler else study.sampler

        def more() -> bool:
            return (len(flight) < b.parallel and started < b.trials and time.monotonic() < deadline
                    and rejected < REJECTIONS_PER_TRIAL * b.trials
                    and (b.max_failures is None or failures < b.max_failures) and not grid_done(study, inner))

        while True:
            if recovery.claims is not None and time.monotonic() - last_foreign > 2.0:
                last_foreign = time.monotonic()
                recovery.settle_foreign(executor, foreign, seen, outcome)
                started = store.counted()  # the budget is the study's, over every driver
            while more():
                if self.sampler is not None and self.prescreen.on and not store.has_waiting():
                    self.prescreen.seen, self.prescreen.in_flight = seen, flight.plans()
                    self.sampler.arm()
                trial = study.ask()
                started += 1
                plan, reasons = self.plan_trial(trial)
                if not reasons:  # a cluster: no node can take it
                    reasons = executor.reject_reasons(plan)
                picked = self.sampler.taken(trial.number) if self.sampler else None
                if picked is not None and picked["chosen"]["params"] == plan.params:
                    trial.set_user_attr(ESTIMATE, picked["chosen"])
                    Prescreen.write_estimate(plan, picked)
                key = config_key(plan.engine, plan.params)
                trial.set_user_attr(KEY, key)
                if reasons:  # costs no GPU time, so no trial of the budget: the sampler learns and draws again
                    teller.reject(trial, plan, reasons, outcome)
                    started -= 1
                    rejected += 1
                    continue
                if key not in seen and recovery.claims is not None:
                    seen.update(recovery.seen_configs())  # what other drivers measured meanwhile
                if key in seen:
                    teller.tell_duplicate(trial, plan, seen[key], outcome)
                    continue
                running = next((p.number for p in flight.plans() if config_key(p.engine, p.params) == key), None)
                if running is not None:
                    parked.setdefault(key, []).append((trial, plan))
                    self.on_event("note", {"text": f"trial {plan.number} has the config trial {running} is "
                                                   "measuring: it will take that result"})
                    continue
                if recovery.claims is not None:
                    holder = recovery.claims.claim(key, trial.number, store.void)
                    if holder is not None:
                        foreign.append((trial, plan, key))
                        self.on_event("note", {"text": f"trial {plan.number} has the config trial {holder} "
                                                       "(another driver) is measuring: it will take that result"})
                        continue
                run_dir.write_record(plan.trial_dir, TrialResult(
                    number=plan.number, engine=plan.engine, params=plan.params, state="running",
                    is_baseline=plan.is_baseline, gpus=plan.gpus))
                held = flight.gpus_held()
                flight.submit(plan, trial)
                self.on_event("launch", {"number": trial.number, "engine": plan.engine, "params": plan.params,
                                         "gpus": plan.gpus, "baseline": plan.is_baseline,
                                         "queued": held + plan.gpus > self.spec.hardware.gpus})
            if not len(flight) and not foreign and teller.deferred:
                teller.flush()  # their baseline will not run in this session
            if not len(flight) and not foreign:
                outcome.stopped_because = ("trial budget reached" if started >= b.trials else
                                           f"the sampler drew {rejected} configurations the rules reject"
                                           if rejected >= REJECTIONS_PER_TRIAL * b.trials else
                                           "every grid point was visited" if grid_done(study, inner) else
                                           "wall time reached" if time.monotonic() >= deadline else
                                           "too many failures")
                break
            done = flight.wait()
            if withdrawn is None and time.monotonic() >= deadline:
                # no engine starts after the wall time: unqueue what has not (nothing is submitted after it,
                # so one look at the in-flight trials is enough)
                withdrawn = flight.withdraw_unlaunched()
            if time.monotonic() - last_beat > 10:
                store.beat(flight.items() + [t for t, _, _ in teller.deferred] + [t for t, _, _ in foreign])
                last_beat = time.monotonic()
            for d in done:
                started, failures = self._settle(d, withdrawn, parked, seen, outcome, started, failures)
        return outcome

    def _settle(self, d: Done[optuna.Trial], withdrawn: set[Any] | None, parked: Parked,
                seen: dict[str, TrialResult], outcome: StudyOutcome, started: int, failures: int) -> tuple[int, int]:
        """A trial back from the executor: told, or (its worker died) withdrawn, moved, or failed as internal.
        Returns the loop's counts of trials started and failed."""
        trial, plan, result = d.item, d.plan, d.result
        key = config_key(plan.engine, plan.params)
        if result is None:
            e = d.error or RuntimeError("no result")
            if withdrawn and d.ref in withdrawn:
                self.recovery.withdraw(trial, plan, parked.pop(key, []))
                return started - 1, failures  # not run: a resumed study runs it within the same budget
            if isinstance(e, TrialLost):  # its node went away: measure the config on another one
                self.recovery.requeue(trial, plan.number, trial.params, plan.is_baseline, str(e))
                started -= 1
                for waiting, waiting_plan in parked.pop(key, []):
                    self.recovery.drop(waiting, waiting_plan.number, str(e))
                    started -= 1  # the requeued trial measures it
                self.on_event("note", {"text": f"trial {plan.number}: {e}"})
                return started, failures
            result = worker_died(plan, e)
            run_dir.write_record(plan.trial_dir, result)
        if self.teller.tell(trial, result, outcome):
            seen[key] = result
        else:
            failures += 1
            if result.failure and result.failure.get("kind") != "internal":
                seen[key] = result
        for waiting, waiting_plan in parked.pop(key, []):
            self.teller.tell_duplicate(waiting, waiting_plan, result, outcome)
        return started, failures
