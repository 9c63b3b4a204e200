"""Pre-launch rules, each stated once. A configuration that breaks one never costs GPU time.

:func:`check` is the whole judgement: the engine-neutral rules here (GPU counts, sharding that must divide
the model's heads and layers), then the engine's own (``Engine.check``: what its flags and kernels refuse),
and, only for a configuration all of those accept, the engine's memory rule (``Engine.check_memory``: its
estimate assumes a configuration the engine would run).
"""
from __future__ import annotations

from typing import Any

from servetune.optimizer.engines.base import Engine, ModelRef
from servetune.optimizer.engines.common import as_int


def gpus_needed(params: dict[str, Any]) -> int:
    return (int(params.get("tensor_parallel") or 1) * int(params.get("pipeline_parallel") or 1)
            * int(params.get("data_parallel") or 1))


def check(engine: Engine, params: dict[str, Any], model: ModelRef, *, gpu: str, gpu_memory_gib: float,
          gpus_available: int, max_gpus_per_trial: int | None = None) -> list[str]:
    """Why this configuration (the engine's defaults under the trial's parameters) must not be launched on
    ``gpus_available`` GPUs of ``gpu_memory_gib`` each, a trial using at most ``max_gpus_per_trial``; [] = launch."""
    shape = model.shape or {}
    reasons = gpu_count_rule(params, gpus_available, max_gpus_per_trial)
    reasons += heads_rule(params, shape)
    reasons += layers_rule(params, shape)
    reasons += engine.check(params, model, gpu=gpu, gpu_memory_gib=gpu_memory_gib, gpus_available=gpus_available)
    if not reasons:
        reasons = engine.check_memory(params, model, gpu=gpu, gpu_memory_gib=gpu_memory_gib)
    return list(dict.fromkeys(reasons))


def gpu_count_rule(params: dict[str, Any], gpus_available: int, max_gpus_per_trial: int | None = None) -> list[str]:
    """The GPUs a configuration takes against what one trial may have: the host's (or its node type's)
    GPUs, capped by ``hardware.max_gpus_per_trial``."""
    tp = as_int(params.get("tensor_parallel"), 1)
    pp = as_int(params.get("pipeline_parallel"), 1)
    dp = as_int(params.get("data_parallel"), 1)
    if min(tp, pp, dp) < 1:
        return [f"tensor_parallel={tp}, pipeline_parallel={pp}, data_parallel={dp} must all be at least 1"]
    need = tp * pp * dp
    cap = min(gpus_available, max_gpus_per_trial or gpus_available)
    if need > cap:
        return [f"needs {need} GPUs (tensor_parallel·pipeline_parallel·data_parallel) but a trial may use {cap}"]
    return []


def heads_rule(params: dict[str, Any], shape: dict[str, Any]) -> list[str]:
    """Tensor parallelism splits the attention heads; KV heads split, or replicate when tp exceeds them."""
    tp = as_int(params.get("tensor_parallel"), 1)
    heads = shape.get("num_attention_heads")
    kv = shape.get("num_key_value_heads") or heads
    if tp < 1:
        return [f"tensor_parallel={tp} must be at least 1"]
    if isinstance(heads, int) and heads % tp:
        return [f"tensor_parallel={tp} does not divide the model's {heads} attention heads"]
    if isinstance(kv, int) and kv % tp and tp % kv:
        return [f"tensor_parallel={tp} and the model's {kv} KV heads: neither divides the other"]
    return []


def layers_rule(params: dict[str, Any], shape: dict[str, Any]) -> list[str]:
    pp = as_int(params.get("pipeline_parallel"), 1)
    layers = shape.get("num_hidden_layers")
    if layers and pp > layers:
        return [f"pipeline_parallel={pp} exceeds the model's {layers} layers"]
    return []
