"""Engine-neutral pre-launch rules. A configuration that breaks one never costs GPU time.

Engine adapters add their own (``Engine.check``); this module holds what is true of any engine: GPU
counts, sharding that must divide the model's heads, and weights that cannot fit.
"""
from __future__ import annotations

from typing import Any

GIB = 1024**3


def gpus_needed(params: dict[str, Any]) -> int:
    return (int(params.get("tensor_parallel") or 1) * int(params.get("pipeline_parallel") or 1)
            * int(params.get("data_parallel") or 1))


def check(params: dict[str, Any], shape: dict[str, Any], *, gpus_available: int, max_gpus_per_trial: int | None,
          gpu_memory_gib: float, default_memory_fraction: float,
          covered: frozenset[str] = frozenset()) -> list[str]:
    """Why the configuration cannot run on any engine. ``covered``: topics ("gpus", "heads", "weights") the
    engine's own check judges (Engine.covers), left out here."""
    reasons: list[str] = []
    tp = int(params.get("tensor_parallel") or 1)
    pp = int(params.get("pipeline_parallel") or 1)
    need = gpus_needed(params)
    cap = min(gpus_available, max_gpus_per_trial or gpus_available)
    # beyond the host's GPUs a covering engine says so itself; the per-trial cap is known only here
    if need > cap and not ("gpus" in covered and need > gpus_available):
        reasons.append(f"needs {need} GPUs (tensor_parallel·pipeline_parallel·data_parallel) but a trial may use {cap}")
    heads = shape.get("num_attention_heads")
    kv_heads = shape.get("num_key_value_heads") or heads
    if "heads" in covered:
        heads = kv_heads = None
    if heads and heads % tp:
        reasons.append(f"tensor_parallel={tp} does not divide the model's {heads} attention heads")
    elif kv_heads and kv_heads % tp and tp % kv_heads:
        reasons.append(f"tensor_parallel={tp} and the model's {kv_heads} KV heads: neither divides the other")
    layers = shape.get("num_hidden_layers")
    if layers and pp > layers:
        reasons.append(f"pipeline_parallel={pp} exceeds the model's {layers} layers")
    weights = weight_bytes(shape, params.get("quantization")) if "weights" not in covered else None
    if weights:
        fraction = float(params.get("memory_fraction") or default_memory_fraction)
        per_gpu = weights / (tp * pp)
        budget = fraction * gpu_memory_gib * GIB
        if per_gpu >= budget:
            reasons.append(f"weights need {per_gpu / GIB:.1f} GiB per GPU but memory_fraction={fraction:g} of "
                           f"{gpu_memory_gib:g} GiB allows {budget / GIB:.1f} GiB: shard wider or quantize")
    return reasons


def weight_bytes(shape: dict[str, Any], quantization: Any) -> float | None:
    """Weights in bytes for the quantization (none = checkpoint dtype, taken as 16-bit)."""
    from servetune.optimizer.model_shapes import ModelShape

    try:
        return float(ModelShape.from_config(shape).weight_bytes(quantization or "none"))
    except (KeyError, ValueError, TypeError):
        params = _param_count(shape)  # an unusual config.json: estimate from the core fields
    if not params:
        return None
    per = 1.0 if str(quantization).startswith("fp8") or quantization in ("int8", "w8a8_int8") else (
        0.5 if quantization in ("awq", "gptq", "int4") else 2.0)
    return params * per


def _param_count(shape: dict[str, Any]) -> float | None:
    try:
        h = shape["hidden_size"]
        inter = shape["intermediate_size"]
        layers = shape["num_hidden_layers"]
        heads = shape["num_attention_heads"]
        kv = shape.get("num_key_value_heads", heads)
        vocab = shape["vocab_size"]
    except KeyError:
        return None
    head_dim = shape.get("head_dim") or h // heads
    experts = shape.get("num_local_experts", 1)
    attn = h * head_dim * (heads + 2 * kv) + heads * head_dim * h
    mlp = 3 * h * inter * experts
    emb = vocab * h * (1 if shape.get("tie_word_embeddings") else 2)
    return layers * (attn + mlp) + emb
