"""What the real-engine adapters (vLLM, SGLang) share: reading engine-neutral parameter values, the rules
both engines judge alike (quantization against the checkpoint, FP8 blocks against the TP split), and the
root-cause line of a crash log. The memory arithmetic behind their "surely OOM" rules is the performance
model's (``optimizer.perfmodel.memory``).
"""
from __future__ import annotations

import re
from typing import Any

from servetune.optimizer.parameters import is_off
from servetune.optimizer.perfmodel.quantization import CHECKPOINT_ONLY, checkpoint_quant, quant_family


def as_int(v: Any, default: int) -> int:
    try:
        return int(v) if v is not None else default
    except (TypeError, ValueError):
        return default


def truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.lower() in ("1", "true", "yes", "on")
    return bool(v)


# -- the checkpoint -----------------------------------------------------------------------------------------
def num_experts(shape: dict[str, Any]) -> int:
    for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        v = shape.get(k)
        if isinstance(v, int) and v > 0:
            return v
    return 0


def is_moe(shape: dict[str, Any]) -> bool:
    return num_experts(shape) > 1


def effective_quant(params: dict[str, Any], shape: dict[str, Any]) -> str | None:
    """What the weights will be: the requested method, else the checkpoint's (engines read it from config.json)."""
    q = params.get("quantization")
    return checkpoint_quant(shape) if is_off(q) else str(q).lower()


def quantization_rules(params: dict[str, Any], shape: dict[str, Any], engine: str) -> list[str]:
    q = params.get("quantization")
    if is_off(q):
        return []
    q = str(q).lower()
    ckpt = checkpoint_quant(shape)
    fam, ckpt_fam = quant_family(q), quant_family(ckpt)
    if ckpt is None:
        if fam in CHECKPOINT_ONLY:
            return [f"quantization={q} needs a checkpoint quantized with {fam.upper()} (its config.json "
                    f"quantization_config); this model has none, so {engine} cannot load it: use none or fp8"]
        return []
    if fam != ckpt_fam:
        return [f"quantization={q} does not match the checkpoint, which is already quantized with {ckpt} "
                f"({engine} refuses the mismatch): leave quantization none"]
    return []


def block_quant_rule(params: dict[str, Any], shape: dict[str, Any]) -> list[str]:
    """Block-quantized FP8 checkpoints: each TP shard of the MLP must be whole blocks (fp8_utils)."""
    qc = shape.get("quantization_config")
    if not isinstance(qc, dict) or quant_family(qc.get("quant_method")) != "fp8":
        return []
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2):
        return []
    tp = as_int(params.get("tensor_parallel"), 1)
    inter = shape.get("moe_intermediate_size") or shape.get("intermediate_size")
    if not isinstance(inter, int) or tp < 1:
        return []
    part = inter / tp
    if part != int(part) or int(part) % int(block[0]) or int(part) % int(block[1]):
        return [f"tensor_parallel={tp} splits the MLP ({inter} wide) into {part:g}-wide shards, not a multiple "
                f"of the checkpoint's FP8 block {list(block)}"]
    return []


# -- the configuration -------------------------------------------------------------------------------------
def max_model_len_of(params: dict[str, Any], shape: dict[str, Any]) -> int:
    v = params.get("max_model_len")
    if v not in (None, "auto", -1):
        return as_int(v, 0)
    return as_int(shape.get("max_position_embeddings"), 4096)


# -- logs ---------------------------------------------------------------------------------------------------
_EXC = re.compile(r"^(?:\(\w+ pid=\d+\)\s+)?(?:ERROR [^\]]*\]\s+)?"
                  r"((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b:?.*)$")


def last_exception(log_tail: str, skip: str | None = None) -> str | None:
    """The last 'SomethingError: message' line of a log (vLLM's process prefixes stripped), skipping lines
    that match ``skip`` (the generic wrapper a failure ends with). None when there is none."""
    rx = re.compile(skip) if skip else None
    for line in reversed(log_tail.splitlines()):
        m = _EXC.match(line.strip())
        if m and not (rx and rx.search(line)) and not m.group(1).startswith("Traceback"):
            text = m.group(1).strip()
            return text if len(text) <= 200 else text[:199] + "…"
    return None
