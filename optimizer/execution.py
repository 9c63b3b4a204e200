"""Trials as Ray tasks: ``num_gpus = tp·pp·dp``, so Ray packs trials onto GPUs and never shares one.

A local Ray instance by default (optimizer/ray_local.py: loopback only, a private temp dir, cleaned up after a
killed driver); ``address`` joins a cluster. For the sim engine we declare the study's
GPU count to Ray as real resources, so packing and GPU-id handling are exercised on a CPU machine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from servetune.optimizer import ray_local, secret_refs
from servetune.optimizer.lifecycle import redact_files, run_trial
from servetune.optimizer.process import reap_orphan
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.trial_executor import TrialExecutor


def cancel_tasks(refs: list, *, force: bool = True, settle_s: float = 0.0) -> None:
    """Cancel Ray tasks; with ``settle_s``, wait that long for them to die, so that no worker still touches
    an engine its caller is about to reap. force=False: Ray drops a queued task and raises
    KeyboardInterrupt in a running one."""
    for ref in refs:
        try:
            ray.cancel(ref, force=force)
        except Exception:
            pass
    if refs and settle_s > 0 and ray.is_initialized():
        try:
            ray.wait(refs, num_returns=len(refs), timeout=settle_s)
        except Exception:
            pass


def _execute(plan_dict: dict[str, Any]) -> dict[str, Any]:
    plan = TrialPlan.from_dict(plan_dict)
    gpu_ids = [int(g) for g in ray.get_gpu_ids()]
    return run_trial(plan, gpu_ids).to_dict()


class RayExecutor(TrialExecutor):
    def __init__(self, num_gpus: int, *, address: str | None = None, declare_gpus: bool = True,
                 run_dir: str | os.PathLike | None = None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self._ray = ray
        self._owns = not ray.is_initialized()
        self._local = None  # a local instance this executor started (loopback, private temp dir)
        if self._owns:
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR,
                                          log_to_driver=True, configure_logging=True)
            if address:
                kwargs["address"] = address
                ray.init(**kwargs)
            else:
                kwargs["num_cpus"] = max(2, os.cpu_count() or 2)
                kwargs["object_store_memory"] = 128 * 1024 * 1024
                if declare_gpus:
                    kwargs["num_gpus"] = num_gpus
                self._local = ray_local.start(run_dir, **kwargs)
        self._remote = ray.remote(_execute)
        self._pending: dict[Any, TrialPlan] = {}  # until its result is taken

    def submit(self, plan: TrialPlan):
        # num_cpus=0: a trial's cost is its GPUs; the engine and load generator are processes of their own
        ref = self._remote.options(num_gpus=plan.gpus, num_cpus=0, max_retries=0).remote(plan.to_dict())
        self._pending[ref] = plan
        return ref

    def wait(self, refs: list, timeout_s: float) -> list:
        if not refs:
            return []
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        return ready

    def result(self, ref) -> TrialResult:
        """The trial's result; raises if the Ray worker died (the caller records that as a failure)."""
        self._pending.pop(ref, None)
        return TrialResult.from_dict(self._ray.get(ref))

    def cancel(self, ref, force: bool = True) -> None:
        cancel_tasks([ref], force=force)

    def shutdown(self) -> None:
        """Stop for good: trials still running (Ctrl-C, an error in the driver) are cancelled, their Ray
        workers killed, and the engines those workers can no longer stop are reaped from their pid files."""
        pending, self._pending = dict(self._pending), {}
        cancel_tasks(list(pending), settle_s=10)
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        for plan in pending.values():
            reap_orphan(Path(plan.trial_dir) / "engine.pid")
            # a killed worker never reached its trial's own masking of the secrets the engine echoed
            redact_files(Path(plan.trial_dir), secret_refs.referenced([*plan.extra_env.values(), *plan.extra_args]))
        if self._local is not None:  # Ray's lingering agents ended, its temp dir and record removed
            self._local.stop()
            self._local = None
