"""Trials on a Ray cluster of many GPU nodes (``--ray-address`` or ``cluster.address``).

A :class:`~servetune.optimizer.trial_executor.TrialExecutor`, as ``execution.RayExecutor`` is, plus what a
cluster needs:

- every GPU node is checked before it gets a trial (``node_checks``: a task pinned to it), and a node that
  cannot run the study is left out, named;
- each trial gets a placement group (``placement``); a trial that lands on another node than the driver's
  runs in a scratch directory there and returns its files with its result (``trial_files``), unless
  ``cluster.files: shared_dir`` says output_dir is the same file system on every node;
- a node that leaves the cluster while a trial runs on it makes that trial :class:`TrialLost`: the driver
  queues its configuration again, to be measured on a node that is still there;
- engines a dead task left behind are reaped on their own node, from their pid files there.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from servetune.optimizer import node_checks, placement, trial_files
from servetune.optimizer.engines import get_engine, simulated
from servetune.optimizer.execution import cancel_tasks
from servetune.optimizer.lifecycle import run_trial
from servetune.optimizer.process import reap_orphan
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.trial_executor import TrialExecutor

NODE_REFRESH_S = 10.0  # how often the driver looks for nodes that joined or left
GPU_NODE_WAIT_S = float(os.environ.get("SERVETUNE_GPU_NODE_WAIT_S", "300"))  # for a first GPU node to join
_NODE_GONE_ERRORS = ("NodeDiedError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError",
                     "ActorDiedError", "RaySystemError", "LocalRayletDiedError", "TaskUnschedulableError")


class TrialLost(RuntimeError):
    """The trial could not be measured for a reason that is not its configuration's (its node left the cluster,
    or turned out unable to run the study): it is to be queued again and measured elsewhere."""


class ClusterUnusable(ValueError):
    """No node of the cluster can run the study (each node's reason is in the message)."""


def scratch_root(node_id: str) -> Path:
    """Where trials of other nodes' drivers run on this node (per node id: nodes may share a machine)."""
    return Path(tempfile.gettempdir(), "servetune-trials", node_id[:16])


def run_placed_trial(plan_dict: dict[str, Any], home_node: str | None, study: str,
                     model_path: str | None) -> dict[str, Any]:
    """The Ray task of one trial on a cluster node: re-check the model here, run the trial (in scratch when
    this is not the driver's node), and return the result with the files."""
    node_id = ray.get_runtime_context().get_node_id()
    plan = TrialPlan.from_dict(plan_dict)
    away = home_node is not None and node_id != home_node
    scratch = trial_files.scratch_dir(scratch_root(node_id), study, plan.trial_dir) if away else None
    if scratch is not None:
        trial_files.remove(scratch)  # a leftover of a lost attempt of this trial number
        plan = replace(plan, trial_dir=str(scratch))
    if plan.extra_env.get("RAY_ADDRESS") == "{cluster}":  # an engine that joins the cluster itself
        plan = replace(plan, extra_env={**plan.extra_env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    done = False
    try:
        unfit = node_checks.recheck(model_path)
        result = None if unfit else run_trial(plan, [int(g) for g in ray.get_gpu_ids()]).to_dict()
        files = trial_files.pack(scratch) if scratch is not None and result is not None else None
        done = True
        return {"result": result, "files": files, "node_id": node_id, "unfit": unfit}
    finally:
        if scratch is not None and (done or not (scratch / "engine.pid").exists()):
            trial_files.remove(scratch)  # (a pid file left by an interrupted trial is what a reaper needs)


def reap_trials_here(study: str, trial_dirs: list[str]) -> int:
    """On one node: kill engine groups of these trials that a dead task or driver left running."""
    root = scratch_root(ray.get_runtime_context().get_node_id())
    killed = 0
    for d in trial_dirs:
        scratch = trial_files.scratch_dir(root, study, d)
        # the scratch copy (object_store), or the trial directory itself (shared_dir: reap_orphan leaves a
        # pid file of another host alone)
        killed += reap_orphan(scratch / "engine.pid") + reap_orphan(Path(d) / "engine.pid")
        trial_files.remove(scratch)
    return killed


@dataclass
class _Pending:
    plan: TrialPlan
    pg: Any = None
    node_id: str | None = None  # known once the placement group is placed (span: chosen up front)
    target: str | None = None  # the node the placement group was aimed at


class ClusterExecutor(TrialExecutor):
    def __init__(self, spec, address: str | None, *, model_path: str | None,
                 on_note: Callable[[str], None] | None = None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self._ray = ray
        self.spec = spec
        self.cluster = spec.cluster
        self.study = spec.name
        self.model_path = model_path
        self._note = on_note or (lambda text: None)
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True,
                         configure_logging=True)
            except ConnectionError as e:
                hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                    " (a cluster with token authentication needs RAY_AUTH_MODE=token here, and its token in "
                    "~/.ray/auth_token or RAY_AUTH_TOKEN)")
                raise ClusterUnusable(f"cannot join the Ray cluster at {address}: {e}{hint}") from None
        self.home = ray.get_runtime_context().get_node_id()
        self._remote = ray.remote(run_placed_trial)
        self._pending: dict[Any, _Pending] = {}
        self.excluded: dict[str, str] = {}  # node id -> why the node is left out
        self._checked: set[str] = set()
        self._nodes: list[placement.Node] = []
        self._names: dict[str, str] = {}
        self._refreshed = 0.0
        self._shared_token = self._write_shared_token() if self.cluster.files == "shared_dir" else None
        try:
            self._refresh(force=True)
            deadline = time.monotonic() + GPU_NODE_WAIT_S
            while not any(n.gpus for n in self._nodes) and time.monotonic() < deadline:
                time.sleep(2.0)  # worker pods may join after the head (KubeRay, an autoscaler)
                self._refresh(force=True)
            usable = [n for n in self._nodes if n.gpus > 0 and n.node_id not in self.excluded]
            if not usable:
                why = "; ".join(f"{self.node_label(n)}: {r}" for n, r in self.excluded.items()) or "it has no GPU node"
                raise ClusterUnusable(f"no node of the Ray cluster can run this study: {why}")
        except BaseException:
            self.shutdown()  # nothing was submitted: the token file and our connection go
            raise

    # nodes -------------------------------------------------------------------------------------------------
    def _write_shared_token(self) -> str:
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        path = (self.spec.run_dir / f".node-check-{uuid.uuid4().hex[:12]}").resolve()
        path.write_text("servetune: visible on every node when output_dir is shared\n")
        return str(path)

    def _expectations(self, node: placement.Node) -> node_checks.NodeExpectations:
        engines = [{"name": e.name, "command": e.command, "version": e.version} for e in self.spec.engines]
        real = any(not simulated(e.name) for e in self.spec.engines)
        ntype = placement.node_type(node, list(self.cluster.node_types))
        gpu = (ntype.gpu if ntype else self.spec.hardware.gpu) if real else None
        return node_checks.NodeExpectations(model_path=self.model_path, engines=engines, gpu_type=gpu,
                                            shared_token=self._shared_token)

    def _refresh(self, force: bool = False) -> None:
        """Look at the nodes again (at most every NODE_REFRESH_S); check the new GPU nodes on themselves."""
        if not force and time.monotonic() - self._refreshed < NODE_REFRESH_S:
            return
        self._refreshed = time.monotonic()
        self._nodes = placement.alive_nodes()
        self._names.update({n.node_id: n.label for n in self._nodes})
        new = [n for n in self._nodes if n.gpus > 0 and n.node_id not in self._checked]
        if not new:
            return
        answers = self._check(new)
        for n in new:
            self._checked.add(n.node_id)
            a = answers[n.node_id]
            for note in a.get("notes", []):
                self._note(f"node {n.label}: {note}")
            if a["reasons"]:
                self.excluded[n.node_id] = "; ".join(a["reasons"])
                self._note(f"node {n.label} is left out of this study: {self.excluded[n.node_id]}")

    def _check(self, nodes: list[placement.Node]) -> dict[str, dict[str, Any]]:
        """Each node's answer to its checks (nodes that expect the same are asked at once)."""
        by_expect: dict[str, list[placement.Node]] = {}
        expects: dict[str, node_checks.NodeExpectations] = {}
        for n in nodes:
            e = self._expectations(n)
            key = repr(e.to_dict())
            by_expect.setdefault(key, []).append(n)
            expects[key] = e
        out: dict[str, dict[str, Any]] = {}
        for key, group in by_expect.items():
            out.update(node_checks.check_nodes([n.node_id for n in group], expects[key]))
        return out

    def node_label(self, node_id: str | None) -> str:
        return self._names.get(node_id or "", (node_id or "?")[:8])

    def _alive(self, node_id: str) -> bool:
        return any(n["NodeID"] == node_id and n.get("Alive") for n in self._ray.nodes())

    # the executor contract -----------------------------------------------------------------------------
    def _placement(self, plan: TrialPlan) -> tuple[placement.Placement | None, list[str]]:
        self._refresh()
        spans = get_engine(plan.engine, plan.engine_command, plan.engine_version).span_nodes_args() is not None
        return placement.place(plan.gpus, plan.params, self._nodes, self.excluded, self.cluster, spans)

    def reject_reasons(self, plan: TrialPlan) -> list[str]:
        """Why no node of the cluster can take this trial (checked before it costs anything), or []."""
        return self._placement(plan)[1]

    def submit(self, plan: TrialPlan):
        place, _ = self._placement(plan)
        home = None if self.cluster.files == "shared_dir" else self.home
        pending = _Pending(plan)
        opts: dict[str, Any] = dict(num_cpus=0, max_retries=0)
        if place is None:  # became impossible since it was planned (a node left): Ray holds it until one fits
            keep_out = {placement.NODE_ID_LABEL: f"!in({','.join(sorted(self.excluded))})"} if self.excluded else {}
            place = placement.Placement("pack", plan.gpus, bundle={"GPU": float(plan.gpus)}, label_selector=keep_out)
        if place.kind == "span":
            assert place.node_id is not None  # placement.place names the node of every span placement
            eng = get_engine(plan.engine, plan.engine_command, plan.engine_version)
            plan = replace(plan, extra_args=[*plan.extra_args, *(eng.span_nodes_args() or [])],
                           extra_env={**plan.extra_env, "RAY_ADDRESS": "{cluster}"})
            pending = _Pending(plan, node_id=place.node_id)
            opts.update(num_gpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(place.node_id, soft=False))
        else:
            target = self._best_fit(place)
            kw: dict[str, Any] = {"_soft_target_node_id": target} if target else {}
            if place.label_selector:
                kw["bundle_label_selector"] = [place.label_selector]
            pg = placement_group([place.bundle], strategy="STRICT_PACK", **kw)
            pending = _Pending(plan, pg=pg, target=target)
            opts.update(num_gpus=plan.gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0))
        ref = self._remote.options(**opts).remote(plan.to_dict(), home, self.study, self.model_path)
        self._pending[ref] = pending
        return ref

    def _best_fit(self, place: placement.Placement) -> str | None:
        """The smallest usable node with the trial's GPUs free now (minus what trials just submitted were aimed
        at, which Ray may not have reserved yet), or None to let Ray choose."""
        try:
            from ray._private.state import available_resources_per_node  # noqa: PLC0415 — private, may be absent

            free = {nid: r.get("GPU", 0.0) for nid, r in available_resources_per_node().items()}
        except Exception:  # a Ray without it: Ray places the group itself
            return None
        for p in self._pending.values():
            if p.target and p.node_id is None:
                free[p.target] = free.get(p.target, 0.0) - p.plan.gpus
        now = [n for n in place.fits if free.get(n.node_id, 0.0) >= place.gpus]
        return min(now, key=lambda n: (n.gpus, -free[n.node_id])).node_id if now else None

    def wait(self, refs: list, timeout_s: float) -> list:
        if not refs:
            return []
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in refs:
            self._locate(self._pending.get(ref))
        return ready

    def _locate(self, p: _Pending | None) -> None:
        """Note the node a trial's placement group landed on, while it can still be asked."""
        if p is None or p.node_id is not None or p.pg is None:
            return
        try:
            table = placement_group_table(p.pg)
        except Exception:
            return
        if table.get("state") == "CREATED":
            p.node_id = table.get("bundles_to_node_id", {}).get(0)

    def launched(self, ref, plan: TrialPlan) -> bool:
        """Whether the trial has its GPUs (its engine starts at once then); False while it waits for them."""
        p = self._pending.get(ref)
        if p is None:
            return True
        self._locate(p)
        return p.node_id is not None

    def result(self, ref) -> TrialResult:
        p = self._pending.pop(ref, None)
        self._locate(p)
        plan = p.plan if p else None
        try:
            out = self._ray.get(ref)
        except Exception as e:
            self._release(p)
            node = p.node_id if p else None
            kind = type(e).__name__
            if kind == "NodeDiedError" or (node and kind in _NODE_GONE_ERRORS and self._gone(node)):
                raise TrialLost(f"node {self.node_label(node)} left the cluster while this trial ran "
                                f"({kind}); its configuration was queued again") from e
            if node and plan is not None:
                self.reap(node, [plan.trial_dir])
            raise
        self._release(p)
        node = out.get("node_id")
        if out.get("unfit"):
            self.excluded[node] = out["unfit"]
            self._note(f"node {self.node_label(node)} is left out of this study: {out['unfit']}")
            raise TrialLost(f"node {self.node_label(node)} cannot run this study: {out['unfit']}; the node was "
                            "left out and the configuration queued again")
        if out.get("files") is not None and plan is not None:
            trial_files.unpack(out["files"], plan.trial_dir)
        r = TrialResult.from_dict(out["result"])
        r.node = self.node_label(node)
        return r

    def _gone(self, node_id: str, patience_s: float = 15.0) -> bool:
        """Whether the node has left (a task's error can arrive before the cluster marks its node dead)."""
        deadline = time.monotonic() + patience_s
        while True:
            if not self._alive(node_id):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    def _release(self, p: _Pending | None) -> None:
        if p is not None and p.pg is not None:
            try:
                remove_placement_group(p.pg)
            except Exception:
                pass
            p.pg = None

    def reap(self, node_id: str, trial_dirs: list[str]) -> None:
        """Kill what trials left running on one node (pid files in their scratch directories there)."""
        if not self._alive(node_id):
            return
        try:
            self._ray.get(self._ray.remote(reap_trials_here).options(
                num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
            ).remote(self.study, trial_dirs), timeout=60)
        except Exception:
            pass

    def reap_everywhere(self, trial_dirs: list[str]) -> None:
        """After a dead driver: its trials' engines may still run on any node."""
        for n in placement.alive_nodes():
            if n.gpus > 0:
                self.reap(n.node_id, trial_dirs)

    def cancel(self, ref, force: bool = True) -> None:
        cancel_tasks([ref], force=force)

    def shutdown(self) -> None:
        pending, self._pending = dict(self._pending), {}
        cancel_tasks(list(pending), settle_s=10)
        if pending and self._ray.is_initialized():
            for p in pending.values():
                if p.node_id:
                    self.reap(p.node_id, [p.plan.trial_dir])
                self._release(p)
        if self._shared_token:
            Path(self._shared_token).unlink(missing_ok=True)
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
