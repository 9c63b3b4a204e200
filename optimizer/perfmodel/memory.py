"""What a configuration holds in GPU memory: weights, KV per token, and a floor for activations.

The numbers are *lower bounds* on what a server needs (weights exactly, KV exactly, activations and runtime
overheads from below), so a configuration the pre-launch rules reject on them would fail on the GPU; one
accepted may still fail there, and the engine's log then says why.
"""
from __future__ import annotations

import math
from typing import Any

from servetune.optimizer.perfmodel.model_shapes import ModelShape
from servetune.optimizer.perfmodel.quantization import PACKED_4BIT, quant_family

GIB = 1024**3
MIB = 1024**2


def model_shape(shape: dict[str, Any]) -> ModelShape | None:
    """The shape of a config.json, or None when it lacks what the arithmetic needs."""
    try:
        return ModelShape.from_config(shape)
    except (ValueError, TypeError, KeyError):
        return None


def weight_bytes(shape: dict[str, Any], quant: str | None) -> float | None:
    """All weights in memory for ``quant`` (None or none = checkpoint dtype). 4-bit AWQ/GPTQ pack the
    decoder projections at bits/8 bytes (+ one 16-bit scale per group), the rest stays 16-bit; fp8 methods
    hold the projections in one byte; any other method is counted at the checkpoint dtype (from below)."""
    ms = model_shape(shape)
    if ms is None:
        return None
    fam = quant_family(quant)
    if fam in PACKED_4BIT:
        found = shape.get("quantization_config")
        qc: dict[str, Any] = found if isinstance(found, dict) else {}
        bits = float(qc.get("bits") or qc.get("w_bit") or 4)
        group = float(qc.get("group_size") or qc.get("q_group_size") or 128)
        per = bits / 8 + (2.0 / group if group > 0 else 0.0)
        base = ms.base_dtype_bytes
        return (ms.num_layers * (ms.linear_params_per_layer * per + ms.other_params_per_layer * base)
                + ms.embedding_bytes + ms.lm_head_bytes + ms.hidden_size * base)
    try:
        return float(ms.weight_bytes("fp8" if fam == "fp8" else "none"))
    except ValueError:
        return float(ms.weight_bytes("none"))


def weights_per_gpu(shape: dict[str, Any], quant: str | None, tp: int, pp: int, dp: int = 1,
                    expert_parallel: bool = False) -> float | None:
    """Weight bytes one GPU holds. With expert parallelism the experts spread over tp·dp ranks."""
    total = weight_bytes(shape, quant)
    if total is None:
        return None
    ms = model_shape(shape)
    if expert_parallel and ms is not None and ms.is_moe and dp > 1:
        frac = ms.num_experts * ms.expert_params * ms.num_layers / max(ms.total_params, 1)
        return total * (1 - frac) / (tp * pp) + total * frac / (tp * dp * pp)
    return total / (tp * pp)


def kv_bytes_per_token_per_gpu(shape: dict[str, Any], kv_dtype: str | None, tp: int, pp: int) -> float | None:
    """K and V of one token on one GPU: its share of layers (pp) and of KV heads (tp; replicated when tp
    exceeds them). 1 byte for any fp8 KV type, else the checkpoint dtype."""
    ms = model_shape(shape)
    if ms is None:
        return None
    d = str(kv_dtype or "auto").lower()
    per = 1.0 if d.startswith("fp8") else ms.base_dtype_bytes
    layers = math.ceil(ms.num_layers / max(pp, 1))
    return 2.0 * layers * ms.kv_heads_per_gpu(max(tp, 1)) * ms.head_dim * per


def activation_floor_bytes(shape: dict[str, Any], tokens: int, tp: int) -> float:
    """From below: the hidden state and one MLP intermediate of a ``tokens``-token forward (16-bit), plus
    512 MiB of runtime the engine never gives to KV (CUDA context, cuBLAS/NCCL workspaces)."""
    ms = model_shape(shape)
    if ms is None:
        return 512 * MIB
    inter = ms.intermediate_size * (ms.experts_per_token if ms.is_moe else 1)
    per_token = 2.0 * (ms.hidden_size + 2 * inter / max(tp, 1))
    return max(tokens, 0) * per_token + 512 * MIB


def fmt_gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB"
