"""Where trials run: the contract between the study driver and an executor.

The driver submits a :class:`TrialPlan`, waits on the references it got back and takes each
:class:`TrialResult`. Two executors keep this contract: ``execution.RayExecutor`` (Ray tasks on one host or
any cluster Ray packs by GPU count) and ``cluster_execution.ClusterExecutor`` (placement groups on checked GPU
nodes). The hooks with a default are what only some executors know: a cluster can say that no node fits a
trial, where an engine a dead driver left behind runs, and whether a queued trial has its GPUs yet.
"""
from __future__ import annotations

import abc
from typing import Any

from servetune.optimizer import run_dir
from servetune.optimizer.records import TrialPlan, TrialResult


class TrialExecutor(abc.ABC):
    @abc.abstractmethod
    def submit(self, plan: TrialPlan) -> Any:
        """Queue the trial; returns the reference :meth:`wait` and :meth:`result` take."""

    @abc.abstractmethod
    def wait(self, refs: list, timeout_s: float) -> list:
        """The references among ``refs`` whose trial has ended, waiting up to ``timeout_s`` for one."""

    @abc.abstractmethod
    def result(self, ref) -> TrialResult:
        """The ended trial's result; raises if the worker that ran it died (the driver records a failure)."""

    @abc.abstractmethod
    def cancel(self, ref, force: bool = True) -> None:
        """force=False: a queued trial is dropped, a running one is interrupted (its engine is stopped)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop for good: trials still running are cancelled and their engines reaped."""

    def reject_reasons(self, plan: TrialPlan) -> list[str]:
        """Why this trial can never run here, checked before it costs anything; [] where any trial that fits
        the study's GPUs can run."""
        return []

    def launched(self, ref, plan: TrialPlan) -> bool:
        """Whether the trial has its GPUs (False while it waits for them). The trial's own record says so
        where it runs on this host."""
        return run_dir.launched(plan.trial_dir)

    def reap_everywhere(self, trial_dirs: list[str]) -> None:
        """Stop the engines a dead driver's trials left running on other nodes. Those on this host are the
        driver's recovery's to reap, so by default there is nothing to do."""
