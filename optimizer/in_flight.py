"""Trials submitted to the executor and not yet back: submit, wait, and a Ray worker that died.

The main loop and the repeats of Pareto candidates both run trials through this; a trial whose worker died
(or was cancelled) comes back with its ``error``, its orphaned engine reaped and its files masked.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from servetune.optimizer import interrupts, run_dir
from servetune.optimizer.process import reap_orphan
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.trial_executor import TrialExecutor

T = TypeVar("T")


@dataclass
class Done(Generic[T]):
    ref: Any
    item: T
    plan: TrialPlan
    result: TrialResult | None  # None: the worker died, see error
    error: Exception | None = None


def worker_died(plan: TrialPlan, e: Exception) -> TrialResult:
    return TrialResult(number=plan.number, engine=plan.engine, params=plan.params, state="failed",
                       is_baseline=plan.is_baseline, gpus=plan.gpus,
                       failure={"kind": "internal", "reason": f"Ray worker died: {type(e).__name__}"})


class InFlight(Generic[T]):
    def __init__(self, executor: TrialExecutor, mask: Callable[[Path], None],
                 on_tick: Callable[[list[TrialPlan]], None] = lambda plans: None):
        self.executor = executor
        self.mask = mask
        self.on_tick = on_tick
        self._refs: dict[Any, tuple[T, TrialPlan]] = {}

    def __len__(self) -> int:
        return len(self._refs)

    def plans(self) -> list[TrialPlan]:
        return [p for _, p in self._refs.values()]

    def items(self) -> list[T]:
        return [item for item, _ in self._refs.values()]

    def gpus_held(self) -> int:
        return sum(p.gpus for p in self.plans())

    def submit(self, plan: TrialPlan, item: T) -> Any:
        ref = self.executor.submit(plan)
        self._refs[ref] = (item, plan)
        return ref

    def wait(self, timeout_s: float = 1.0) -> list[Done[T]]:
        interrupts.check()  # a Ctrl-C the interpreter dropped still stops the study, within one wait
        ready = self.executor.wait(list(self._refs), timeout_s=timeout_s)
        self.on_tick(self.plans())
        out = []
        for ref in ready:
            item, plan = self._refs.pop(ref)
            try:
                out.append(Done(ref, item, plan, self.executor.result(ref)))
            except Exception as e:  # the Ray worker died (or was cancelled): its engine may be orphaned
                reap_orphan(run_dir.engine_pid_file(plan.trial_dir))
                self.mask(Path(plan.trial_dir))
                out.append(Done(ref, item, plan, None, e))
        return out

    def withdraw_unlaunched(self) -> set[Any]:
        """Cancel the trials still queued in Ray, never launched; returns their refs (they come back from
        :meth:`wait` with an error)."""
        refs = {ref for ref, (_, plan) in self._refs.items() if not self.executor.launched(ref, plan)}
        for ref in refs:
            self.executor.cancel(ref, force=False)
        return refs
