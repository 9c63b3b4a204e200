"""Where a trial of G GPUs runs on a Ray cluster, decided from the nodes that are up.

- G GPUs that fit on one node: one placement-group bundle of G GPUs, ``STRICT_PACK``, so tensor parallel
  never crosses a node (the bundle carries the node type's ``accelerator_type:`` resource when the study
  names node types, and a label selector keeps it off the nodes that failed their checks). It is aimed at
  the smallest node that has G GPUs free now (best fit: the big nodes stay free for the big trials; Ray
  alone would pack every trial onto one node while others idle).
- More GPUs than any node has: only with ``cluster.span_nodes`` and an engine with its own multi-node
  executor (vLLM's Ray backend), which reserves the GPUs itself; servetune's task then holds none.
- Heterogeneous clusters: a node's type is the ``cluster.node_types`` entry whose Ray resource it carries;
  the trial's ``gpu`` parameter (searched when there are several types) picks the type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node


@dataclass(frozen=True)
class Node:
    node_id: str
    name: str  # Ray's node name: the IP unless `ray start --node-name` set one
    gpus: int
    resources: dict[str, float] = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.node_id[:8]})"


def alive_nodes() -> list[Node]:
    return [Node(n["NodeID"], n.get("NodeName") or n.get("NodeManagerAddress", "?"),
                 int(n.get("Resources", {}).get("GPU", 0)), dict(n.get("Resources", {})))
            for n in ray.nodes() if n.get("Alive")]


def node_type(node: Node, types: list) -> Any | None:
    """The ``cluster.node_types`` entry this node belongs to (None: no entry names it)."""
    return next((t for t in types if node.resources.get(t.ray_resource, 0) > 0), None)


def type_named(types: list, gpu: str | None) -> Any | None:
    return next((t for t in types if t.gpu == gpu), None) if gpu else None


@dataclass
class Placement:
    kind: str  # "pack": one bundle on one node; "span": the engine places its own workers across nodes
    gpus: int
    bundle: dict[str, float] = field(default_factory=dict)
    label_selector: dict[str, str] = field(default_factory=dict)
    node_id: str | None = None  # span: the node the engine's API server (and servetune's task) runs on
    fits: list[Node] = field(default_factory=list)  # pack: the usable nodes with enough GPUs, smallest first


def place(gpus: int, params: dict[str, Any], nodes: list[Node], excluded: dict[str, str], cluster,
          engine_spans: bool) -> tuple[Placement | None, list[str]]:
    """The placement for a trial needing ``gpus`` GPUs, or why none of the usable nodes can take it
    (``excluded``: node id → why that node is left out; named where it would have taken the trial)."""
    types = list(cluster.node_types)
    want = type_named(types, params.get("gpu")) if types else None
    fitting = [n for n in nodes if n.gpus > 0
               and (not types or node_type(n, types) is not None)  # named types: other nodes are not ours
               and (want is None or node_type(n, types) is want)]
    usable = [n for n in fitting if n.node_id not in excluded]
    kind = f"{want.gpu} " if want else ""
    left_out = "; ".join(f"{n.label} has {n.gpus} but is left out: {excluded[n.node_id]}" for n in fitting
                         if n.node_id in excluded and n.gpus >= gpus)
    if not usable:
        return None, [f"no usable {kind}GPU node is in the cluster now" + (f" ({left_out})" if left_out else "")]
    largest = max(usable, key=lambda n: n.gpus)
    selector = {NODE_ID_LABEL: f"!in({','.join(sorted(excluded))})"} if excluded else {}
    if gpus <= largest.gpus:
        bundle: dict[str, float] = {"GPU": float(gpus)}
        if want is not None:
            bundle[want.ray_resource] = 0.001
        fits = sorted((n for n in usable if n.gpus >= gpus), key=lambda n: n.gpus)
        return Placement("pack", gpus, bundle=bundle, label_selector=selector, fits=fits), []
    tp = int(params.get("tensor_parallel") or 1)
    pp = int(params.get("pipeline_parallel") or 1)
    total = sum(n.gpus for n in usable)
    where = f"the largest usable {kind}node ({largest.label}) has {largest.gpus}"
    if left_out:
        where += f"; {left_out}"
    if not cluster.span_nodes:
        return None, [f"needs {gpus} GPUs on one node and {where}; cluster.span_nodes: true lets "
                      "pipeline_parallel cross nodes"]
    if not engine_spans:
        return None, [f"needs {gpus} GPUs and {where}; this engine cannot spread one server over nodes here "
                      "(vllm can, through its Ray executor)"]
    if tp > largest.gpus:
        return None, [f"tensor_parallel={tp} exceeds the {largest.gpus} GPUs of the largest usable {kind}node; "
                      "only pipeline_parallel stages cross nodes"]
    if gpus > total:
        return None, [f"needs {gpus} GPUs and the usable {kind}nodes have {total} together"]
    if pp < 2:
        return None, [f"needs {gpus} GPUs and {where}; spanning nodes needs pipeline_parallel > 1"]
    return Placement("span", gpus, node_id=largest.node_id), []
