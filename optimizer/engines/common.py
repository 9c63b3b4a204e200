"""What the real-engine adapters (vLLM, SGLang) share: facts about the checkpoint, the memory arithmetic
behind their "surely OOM" rules, and the reading of their /metrics into engine-neutral numbers.

The memory numbers are *lower bounds* on what a server needs (weights exactly, KV exactly, activations and
runtime overheads from below), so a configuration rejected here would fail on the GPU; one accepted may
still fail there, and the engine's log then says why (``classify``).
"""
from __future__ import annotations

import math
import re
from typing import Any

from servetune.optimizer.parameters import is_off  # noqa: F401  (the engines' C.is_off; search_spaces/parameters.yaml)

GIB = 1024**3
MIB = 1024**2

# Weight quantization families: names an engine treats as the same checkpoint format.
QUANT_FAMILIES: dict[str, str] = {
    "awq": "awq", "awq_marlin": "awq", "auto_awq": "awq",
    "gptq": "gptq", "gptq_marlin": "gptq", "auto_gptq": "gptq", "marlin": "gptq",
    "fp8": "fp8", "fbgemm_fp8": "fp8",
    "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors",
    "modelopt": "modelopt", "modelopt_fp8": "modelopt", "modelopt_fp4": "modelopt",
}
CHECKPOINT_ONLY = ("awq", "gptq")  # families that need weights quantized that way on disk

# Compute capability by GPU kind (hardware.py names): decides e.g. which attention kernels take fp8 KV.
SM_BY_GPU = {"h100": 90, "h200": 90, "a100": 80, "l40s": 89, "l4": 89, "b200": 100}


def as_int(v: Any, default: int) -> int:
    try:
        return int(v) if v is not None else default
    except (TypeError, ValueError):
        return default


def truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.lower() in ("1", "true", "yes", "on")
    return bool(v)


def gpu_sm(gpu: str | None) -> int | None:
    if not gpu:
        return None
    try:
        from servetune.optimizer.hardware import _normalize

        key = _normalize(gpu)
    except Exception:  # pragma: no cover - hardware table unavailable
        key = str(gpu).lower()
    return SM_BY_GPU.get(key)


# -- the checkpoint -----------------------------------------------------------------------------------------
def num_experts(shape: dict[str, Any]) -> int:
    for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        v = shape.get(k)
        if isinstance(v, int) and v > 0:
            return v
    return 0


def is_moe(shape: dict[str, Any]) -> bool:
    return num_experts(shape) > 1


def checkpoint_quant(shape: dict[str, Any]) -> str | None:
    """The checkpoint's own quantization (config.json ``quantization_config.quant_method``), lower-cased."""
    qc = shape.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method"):
        return str(qc["quant_method"]).lower()
    return None


def quant_family(q: str | None) -> str | None:
    if q is None or is_off(q):
        return None
    q = str(q).lower()
    return QUANT_FAMILIES.get(q, q)


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


def heads_rules(params: dict[str, Any], shape: dict[str, Any]) -> list[str]:
    tp = as_int(params.get("tensor_parallel"), 1)
    heads = shape.get("num_attention_heads")
    kv = shape.get("num_key_value_heads") or heads
    out = []
    if tp < 1:
        return [f"tensor_parallel={tp} must be at least 1"]
    if isinstance(heads, int) and heads % tp:
        out.append(f"tensor_parallel={tp} does not divide the model's {heads} attention heads")
    elif isinstance(kv, int) and kv % tp and tp % kv:
        out.append(f"tensor_parallel={tp} and the model's {kv} KV heads: neither divides the other")
    return out


def gpu_count_rule(params: dict[str, Any], gpus_available: int) -> list[str]:
    tp = as_int(params.get("tensor_parallel"), 1)
    pp = as_int(params.get("pipeline_parallel"), 1)
    dp = as_int(params.get("data_parallel"), 1)
    if min(tp, pp, dp) < 1:
        return [f"tensor_parallel={tp}, pipeline_parallel={pp}, data_parallel={dp} must all be at least 1"]
    if tp * pp * dp > gpus_available:
        return [f"tensor_parallel·pipeline_parallel·data_parallel = {tp}·{pp}·{dp} = {tp * pp * dp} GPUs, "
                f"but {gpus_available} are available"]
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


# -- memory -------------------------------------------------------------------------------------------------
def _shape(shape: dict[str, Any]):
    from servetune.optimizer.model_shapes import ModelShape

    try:
        return ModelShape.from_config(shape)
    except (ValueError, TypeError, KeyError):
        return None


def weight_bytes(shape: dict[str, Any], quant: str | None) -> float | None:
    """All weights in memory for ``quant`` (None = checkpoint dtype). 4-bit AWQ/GPTQ pack the decoder
    projections at bits/8 bytes (+ one 16-bit scale per group), the rest stays 16-bit."""
    ms = _shape(shape)
    if ms is None:
        return None
    fam = quant_family(quant)
    if fam in ("awq", "gptq"):
        qc = shape.get("quantization_config") if isinstance(shape.get("quantization_config"), dict) else {}
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
    ms = _shape(shape)
    if expert_parallel and ms is not None and ms.is_moe and dp > 1:
        frac = ms.num_experts * ms.expert_params * ms.num_layers / max(ms.total_params, 1)
        return total * (1 - frac) / (tp * pp) + total * frac / (tp * dp * pp)
    return total / (tp * pp)


def kv_bytes_per_token_per_gpu(shape: dict[str, Any], kv_dtype: str | None, tp: int, pp: int) -> float | None:
    """K and V of one token on one GPU: its share of layers (pp) and of KV heads (tp; replicated when tp
    exceeds them). 1 byte for any fp8 KV type, else the checkpoint dtype."""
    ms = _shape(shape)
    if ms is None:
        return None
    d = str(kv_dtype or "auto").lower()
    per = 1.0 if d.startswith("fp8") else ms.base_dtype_bytes
    layers = math.ceil(ms.num_layers / max(pp, 1))
    return 2.0 * layers * ms.kv_heads_per_gpu(max(tp, 1)) * ms.head_dim * per


def activation_floor_bytes(shape: dict[str, Any], tokens: int, tp: int) -> float:
    """From below: the hidden state and one MLP intermediate of a ``tokens``-token forward (16-bit), plus
    512 MiB of runtime the engine never gives to KV (CUDA context, cuBLAS/NCCL workspaces)."""
    ms = _shape(shape)
    if ms is None:
        return 512 * MIB
    inter = ms.intermediate_size * (ms.experts_per_token if ms.is_moe else 1)
    per_token = 2.0 * (ms.hidden_size + 2 * inter / max(tp, 1))
    return max(tokens, 0) * per_token + 512 * MIB


def max_model_len_of(params: dict[str, Any], shape: dict[str, Any]) -> int:
    v = params.get("max_model_len")
    if v not in (None, "auto", -1):
        return as_int(v, 0)
    return as_int(shape.get("max_position_embeddings"), 4096)


def fmt_gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB"


# -- logs ---------------------------------------------------------------------------------------------------
_EXC = re.compile(r"^(?:\(\w+ pid=\d+\)\s+)?(?:ERROR [^\]]*\]\s+)?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b:?.*)$")


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


# -- /metrics -----------------------------------------------------------------------------------------------
def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _clean(d: dict[str, float | None]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in d.items() if v is not None and math.isfinite(float(v))}


# Metrics kept per label value (Engine.parse_metrics): vLLM counts accepted tokens per draft position.
VLLM_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
VLLM_SPLIT = {VLLM_PER_POSITION: "position"}
SPEC_POSITIONS_SHOWN = 16  # suffix decoding drafts up to 24 tokens; later positions are almost never accepted


def spec_per_position(before: dict[str, float], after: dict[str, float], drafts: float | None) -> dict[str, float]:
    """``spec_acceptance_pos{i}``: the share of drafts whose token i was accepted (vLLM's per-position rate,
    Δaccepted_per_pos[i] / Δnum_drafts)."""
    from servetune.optimizer.engines.prometheus import labelled_key

    out: dict[str, float] = {}
    if not drafts:
        return out
    for i in range(SPEC_POSITIONS_SHOWN):
        key = labelled_key(VLLM_PER_POSITION, "position", str(i))
        if key not in after:
            break
        out[f"spec_acceptance_pos{i}"] = (after[key] - before.get(key, 0.0)) / drafts
    return out


def summarize_vllm_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """vLLM /metrics (also what the sim exposes) between two scrapes → engine-neutral keys.

    Counters become deltas, ratios are of deltas; gauges (kv_cache_usage, running, waiting) are the value at
    ``after``. Series with several labels (e.g. one per data-parallel engine) arrive summed. Speculative
    decoding: drafts (verifications carrying drafts), draft and accepted tokens, their ratio, the mean
    acceptance length (1 + accepted / drafts: the bonus token counts) and the per-position rates.
    """
    d = lambda n: _delta(before, after, n)  # noqa: E731
    drafts, draft_tokens, accepted = (d("vllm:spec_decode_num_drafts_total"),
                                      d("vllm:spec_decode_num_draft_tokens_total"),
                                      d("vllm:spec_decode_num_accepted_tokens_total"))
    mean_len = _ratio(accepted, drafts)
    return _clean({
        "spec_drafts": drafts,
        "spec_draft_tokens": draft_tokens,
        "spec_accepted_tokens": accepted,
        **spec_per_position(before, after, drafts),
        "kv_cache_usage": after.get("vllm:kv_cache_usage_perc"),
        "running": after.get("vllm:num_requests_running"),
        "waiting": after.get("vllm:num_requests_waiting"),
        "preemptions": d("vllm:num_preemptions_total"),
        "prefix_cache_hit_rate": _ratio(d("vllm:prefix_cache_hits_total"), d("vllm:prefix_cache_queries_total")),
        "spec_acceptance_rate": _ratio(accepted, draft_tokens),
        "spec_mean_acceptance_length": None if mean_len is None else 1.0 + mean_len,
        "prompt_tokens": d("vllm:prompt_tokens_total"),
        "generation_tokens": d("vllm:generation_tokens_total"),
        "requests_succeeded": d("vllm:request_success_total"),
    })


def summarize_sglang_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """SGLang /metrics (``--enable-metrics``) between two scrapes → the same engine-neutral keys as vLLM.

    SGLang retracts (re-queues) requests where vLLM preempts them: both count as ``preemptions``. Its
    speculative acceptance rate is a gauge of the latest logged batch, taken at ``after``; the mean acceptance
    length over the window comes from counters where SGLang has them: every verification call of a request
    emits its accepted drafts plus one token, and each request's first token comes from its prefill, so it is
    (Δgeneration tokens − Δrequests) / Δspec_verify_calls (the gauge otherwise).
    """
    d = lambda n: _delta(before, after, n)  # noqa: E731
    hit = _ratio(d("sglang:cached_tokens_total"), d("sglang:prompt_tokens_total"))
    if hit is None:
        hit = after.get("sglang:cache_hit_rate")
    pre = d("sglang:num_retracted_requests_total")
    verify, gen, reqs = d("sglang:spec_verify_calls_total"), d("sglang:generation_tokens_total"), \
        d("sglang:num_requests_total")
    mean_len = _ratio(None if gen is None or reqs is None else gen - reqs, verify)
    return _clean({
        "spec_drafts": verify if verify else None,
        "kv_cache_usage": after.get("sglang:token_usage"),
        "running": after.get("sglang:num_running_reqs"),
        "waiting": after.get("sglang:num_queue_reqs"),
        "preemptions": pre if pre is not None else after.get("sglang:num_retracted_reqs"),
        "prefix_cache_hit_rate": hit,
        "spec_acceptance_rate": after.get("sglang:spec_accept_rate"),
        "spec_mean_acceptance_length": mean_len if mean_len is not None else after.get("sglang:spec_accept_length"),
        "prompt_tokens": d("sglang:prompt_tokens_total"),
        "generation_tokens": d("sglang:generation_tokens_total"),
        "requests_succeeded": d("sglang:num_requests_total"),
    })


# -- the audit's counters (loadgen.audit.COUNTERS) ----------------------------------------------------------
def vllm_audit_counters(m: dict[str, float]) -> dict[str, float]:
    """vLLM's (and the sim's) cumulative counters. ``vllm:request_success_total`` carries every finish
    reason (stop, length, abort, ...), summed here: the requests the engine finished."""
    names = {"prompt_tokens": "vllm:prompt_tokens_total", "generation_tokens": "vllm:generation_tokens_total",
             "prefix_cache_queries": "vllm:prefix_cache_queries_total",
             "prefix_cache_hits": "vllm:prefix_cache_hits_total", "preemptions": "vllm:num_preemptions_total",
             "requests_finished": "vllm:request_success_total", "kv_cache_usage": "vllm:kv_cache_usage_perc"}
    out = {k: m[n] for k, n in names.items() if n in m}
    if "vllm:num_requests_running" in m:
        out["in_flight"] = m["vllm:num_requests_running"] + m.get("vllm:num_requests_waiting", 0.0)
    return out


def sglang_audit_counters(m: dict[str, float]) -> dict[str, float]:
    """SGLang's cumulative counters (``--enable-metrics``). Its radix cache looks up every prompt token, so
    the prompt tokens are the queries; ``cached_tokens_total`` are the hits; a retracted request is
    SGLang's preemption. Its token counters move when a request finishes (tokenizer manager)."""
    names = {"prompt_tokens": "sglang:prompt_tokens_total", "generation_tokens": "sglang:generation_tokens_total",
             "prefix_cache_queries": "sglang:prompt_tokens_total", "prefix_cache_hits": "sglang:cached_tokens_total",
             "preemptions": "sglang:num_retracted_requests_total", "requests_finished": "sglang:num_requests_total",
             "kv_cache_usage": "sglang:token_usage"}
    out = {k: m[n] for k, n in names.items() if n in m}
    if "sglang:num_running_reqs" in m:
        out["in_flight"] = m["sglang:num_running_reqs"] + m.get("sglang:num_queue_reqs", 0.0)
    return out
