"""What a node must offer before a trial launches there, checked on that node.

The driver's view of the model directory, the engine command or the GPUs says nothing about a worker node:
each node is asked by a Ray task pinned to it (``NodeAffinitySchedulingStrategy``, not soft), and a node
that cannot run the study is left out with its name and reason. A trial re-checks the model right before
its launch (``recheck``), so a mount that vanished mid-study is caught on the node that lost it.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from servetune.optimizer.engines import get_engine
from servetune.optimizer.perfmodel.hardware import get_gpu

# A GPU using more than this before any trial of ours holds it is busy with something else.
BUSY_MIB = 2048.0


@dataclass
class NodeExpectations:
    """What every node of the study must have (plain data: it travels to the node)."""

    model_path: str | None = None  # a checkpoint directory (None: a preset shape, nothing to find)
    engines: list[dict[str, Any]] = field(default_factory=list)  # {name, command, version} of each engine
    gpu_type: str | None = None  # GPU kind the study's rules assume (None: fake GPUs, not checked)
    shared_token: str | None = None  # with cluster.files: shared_dir, a file the driver wrote in output_dir

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_problem(model_path: str | None) -> str | None:
    if not model_path:
        return None
    p = Path(model_path)
    if not p.is_dir():
        return f"model path {model_path} does not exist"
    if not (p / "config.json").is_file():
        return f"model path {model_path} has no config.json"
    return None


def _gpus() -> list[dict[str, Any]] | None:
    """Name, total and used memory of each GPU nvidia-smi sees here; None without an NVIDIA driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        idx, name, total, used = (x.strip() for x in line.split(","))
        gpus.append({"index": int(idx), "name": name, "total_mib": float(total), "used_mib": float(used)})
    return gpus


def gpu_type_matches(expected: str, nvidia_name: str) -> bool:
    """Whether nvidia-smi's name ("NVIDIA H100 80GB HBM3") is the study's GPU kind ("h100")."""
    try:
        return get_gpu(nvidia_name).name == expected
    except ValueError:  # a spelling the table does not know: the kind must appear as a word
        words = nvidia_name.lower().replace("-", " ").split()
        return expected.lower() in words


def check_here(expect: dict[str, Any], gpu_ids: list[int] | None = None) -> dict[str, Any]:
    """Run on the node being judged: its name, and the reasons it cannot run the study ([] = fit).
    ``gpu_ids``: the GPUs Ray gave this task (the ones whose type and memory matter); None = all."""
    e = NodeExpectations(**expect)
    reasons: list[str] = []
    notes: list[str] = []
    problem = model_problem(e.model_path)
    if problem:
        reasons.append(problem)
    for es in e.engines:
        program = get_engine(es["name"], es.get("command"), es.get("version")).base_command()[0]
        if not (os.path.isabs(program) and os.access(program, os.X_OK)) and not shutil.which(program):
            reasons.append(f"{es['name']}: {program!r} is not installed here (not on PATH)")
    if e.shared_token and not Path(e.shared_token).is_file():
        reasons.append(f"output_dir is not shared with this node: {e.shared_token} is not visible here "
                       "(cluster.files: shared_dir needs output_dir on one file system mounted at the same "
                       "path on every node)")
    if e.gpu_type:
        gpus = _gpus()
        if gpus is None:
            reasons.append("nvidia-smi is not available: no NVIDIA driver on this node")
        else:
            mine = [g for g in gpus if gpu_ids is None or g["index"] in gpu_ids]
            wrong = sorted({g["name"] for g in mine if not gpu_type_matches(e.gpu_type, g["name"])})
            if wrong:
                reasons.append(f"has {', '.join(wrong)}, not the study's {e.gpu_type}")
            busy = [f"{g['index']} ({g['used_mib'] / 1024:.1f} GiB)" for g in mine if g["used_mib"] >= BUSY_MIB]
            if busy:
                notes.append(f"GPU memory already in use on GPU {', '.join(busy)}")
    return {"host": socket.gethostname(), "reasons": reasons, "notes": notes}


def recheck(model_path: str | None) -> str | None:
    """The model again, right before the engine starts (inside the trial, on its node)."""
    return model_problem(model_path)


def check_nodes(node_ids: list[str], expect: NodeExpectations, timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
    """Ask each node (a Ray task pinned to it) whether it can run the study: node id → ``check_here``'s
    answer, or reasons saying the node did not answer."""
    remote = ray.remote(check_here)
    refs = {nid: remote.options(num_cpus=0, max_retries=0,
                                scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)
                                ).remote(expect.to_dict()) for nid in node_ids}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, dict[str, Any]] = {}
    for nid, ref in refs.items():
        if ref not in ready:
            ray.cancel(ref, force=True)
            out[nid] = {"host": "", "reasons": [f"did not answer the node check in {timeout_s:.0f} s"], "notes": []}
            continue
        try:
            out[nid] = ray.get(ref)
        except Exception as e:  # the node died or its worker could not start
            out[nid] = {"host": "", "reasons": [f"the node check failed: {type(e).__name__}"], "notes": []}
    return out
