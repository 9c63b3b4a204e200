"""Trials that will not be measured where they started: a dead driver's, one withdrawn at the wall time, one
whose node went away, one waiting on another driver's measurement that ended without a result.

Each is failed as stale (not counted against the budget; its record says why) and its configuration queued
again, once: a trial parked on a configuration another trial measures, or one measured since, is only dropped.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from servetune.optimizer import run_dir, secret_refs
from servetune.optimizer.lifecycle import redact_files
from servetune.optimizer.process import reap_orphan
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.shared_study import ConfigClaims, stored_record
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import BASELINE, ENGINE, KEY, STALE, StudyStore
from servetune.optimizer.summary import StudyOutcome
from servetune.optimizer.teller import Teller
from servetune.optimizer.trial_executor import TrialExecutor

Foreign = list[tuple[optuna.Trial, TrialPlan, str]]  # trials waiting on another driver's measurement


class Recovery:
    def __init__(self, spec: StudySpec, store: StudyStore, teller: Teller,
                 on_event: Callable[[str, dict[str, Any]], None]):
        self.spec = spec
        self.store = store
        self.teller = teller
        self.on_event = on_event
        self.base = spec.run_dir
        self.stale_dirs: list[str] = []  # trials a dead driver left running (their engines are reaped)
        self.claims: ConfigClaims | None = None  # shared storage: configurations claimed in the database

    def tdir(self, number: int) -> Path:
        return run_dir.trial_dir(self.base, number)

    def recover(self, exclusive: bool) -> int:
        """Trials left RUNNING by a dead driver: reap their engines, mark them failed, queue them again."""
        requeued = 0
        stale = set() if exclusive else set(self.store.fail_stale())
        requeued_keys: set[str] = set()
        seen: dict[str, TrialResult] | None = None
        for ft in self.store.trials():
            running = ft.state == optuna.trial.TrialState.RUNNING and exclusive
            if not (running or ft.number in stale):
                continue
            tdir = self.tdir(ft.number)
            reap_orphan(run_dir.engine_pid_file(tdir))
            self.mask_secrets(tdir)  # the dead driver's trial never masked its files
            self.stale_dirs.append(str(tdir.resolve()))
            finished = self._finished_on_disk(tdir) if running else None
            handle = self.store.handle(ft) if finished is not None else None
            if finished is not None and handle is not None:  # measured, but the driver died before telling Optuna
                self.teller.tell(handle, finished, StudyOutcome(self.base))
                continue
            # one requeue per config: a trial parked on the config another was measuring (or a config measured
            # since) would come back as a duplicate and spend a trial of the budget on nothing
            key = ft.user_attrs.get(KEY)
            seen = self.seen_configs() if seen is None else seen
            if key and (key in requeued_keys or key in seen):
                why = "driver stopped while this trial waited for the same config's result; not queued again"
                if running:
                    self.drop(ft.number, ft.number, why)
                else:
                    run_dir.mark_stale(tdir, ft.number, why)
                continue
            if key:
                requeued_keys.add(key)
            self.requeue(ft.number, ft.number, ft.params, bool(ft.user_attrs.get(BASELINE)),
                         "driver stopped while this trial ran; it was queued again", fail=running,
                         engine=ft.user_attrs.get(ENGINE))
            requeued += 1
        return requeued

    def requeue(self, trial: optuna.Trial | int, number: int, params: dict[str, Any], baseline: bool,
                reason: str, fail: bool = True, engine: str | None = None) -> None:
        """A trial that will not be measured here: failed as stale (not counted), its config queued again
        (a baseline with its engine: its params are empty)."""
        if fail:
            self.drop(trial, number, reason)
        else:
            run_dir.mark_stale(self.tdir(number), number, reason)
        attrs = {BASELINE: True, **({ENGINE: engine} if engine else {})} if baseline else {}
        self.store.study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)

    def drop(self, trial: optuna.Trial | int, number: int, reason: str) -> None:
        """Fail a trial as stale: it is not counted against the budget and its record says why."""
        self.store.drop(trial)
        run_dir.mark_stale(self.tdir(number), number, reason)

    def withdraw(self, trial: optuna.Trial, plan: TrialPlan, parked: list[tuple[optuna.Trial, TrialPlan]]) -> None:
        """A trial still waiting for GPUs at the wall time: not run, queued again for a resumed study (trials
        parked on its config are dropped: the requeued one measures it)."""
        why = "the wall time came before GPUs for this trial were free; it was queued again for a resumed study"
        self.requeue(trial, plan.number, trial.params, plan.is_baseline, why, engine=plan.engine)
        for waiting, waiting_plan in parked:
            self.drop(waiting, waiting_plan.number, why)
        self.on_event("note", {"text": f"trial {plan.number} had not started by the wall time: withdrawn, "
                                       "queued again for a resumed study"})

    def mask_secrets(self, tdir: Path) -> None:
        """Mask referenced secret values in a trial whose worker died before the lifecycle could."""
        texts = [x for e in self.spec.engines for x in (*e.env.values(), *e.extra_args)]
        redact_files(Path(tdir), secret_refs.referenced(texts))

    @staticmethod
    def _finished_on_disk(tdir: Path) -> TrialResult | None:
        r = run_dir.read_result(tdir)
        if r is not None and (r.state == "complete"
                              or (r.state == "failed" and (r.failure or {}).get("kind") != "internal")):
            return r
        return None

    def seen_configs(self) -> dict[str, TrialResult]:
        """Each configuration with a result (measured, or failed for a reason of its own), by config key."""
        seen: dict[str, TrialResult] = {}
        for ft in self.store.trials():
            key = ft.user_attrs.get(KEY)
            if not key or ft.user_attrs.get(STALE) or not ft.state.is_finished():
                continue
            r = run_dir.read_result(self.tdir(ft.number))
            if r is None:
                rec = stored_record(ft)  # measured by another driver, or before a move to another node
                if rec is None:
                    continue
                r = TrialResult.from_dict({**rec, "number": ft.number})
            if r.state == "complete" or (r.failure and r.failure.get("kind") not in ("internal",)):
                seen[key] = r
        return seen

    # several drivers on one study (shared storage) -------------------------------------------------------
    def settle_foreign(self, executor: TrialExecutor, foreign: Foreign, seen: dict[str, TrialResult],
                       outcome: StudyOutcome) -> None:
        """Trials waiting on another driver's measurement: take its result once there is one; when it ended
        without one, drop the waiting trial (stale: out of the budget) and queue the configuration again.
        Trials of a driver that stopped beating are failed as stale and queued again first (as a restarted
        driver would)."""
        before = len(self.stale_dirs)
        if self.recover(exclusive=False):
            executor.reap_everywhere(self.stale_dirs[before:])
        if not foreign or self.claims is None:
            return
        seen.update(self.seen_configs())
        for entry in list(foreign):
            trial, plan, key = entry
            if key in seen:
                foreign.remove(entry)
                self.teller.tell_duplicate(trial, plan, seen[key], outcome)
                continue
            holder = self.claims.holder(key)
            if holder is None or self.store.void(holder):
                foreign.remove(entry)
                why = "the trial measuring this config (another driver) ended without a result"
                held = self.store.frozen(holder) if holder is not None else None
                if held is not None and held.user_attrs.get(STALE):
                    self.drop(trial, plan.number, why + "; it was queued again")
                else:  # an internal failure: nobody queued it again
                    self.requeue(trial, plan.number, trial.params, plan.is_baseline, why + "; queued again")
