"""What one sim launch is: its configuration (:class:`SimConfig`, the engine flags' values and their rules),
the memory it plans (:func:`memory_plan`: weights, activations and reserve, and the KV cache that is left, as
vLLM's start-up profile decides it) and the roofline its steps are timed by (:func:`build_roofline`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from servetune.optimizer.engines.sim.answer import SUFFIX_DEPTH
from servetune.optimizer.perfmodel.hardware import GIB, GpuSpec
from servetune.optimizer.perfmodel.model_shapes import ModelShape
from servetune.optimizer.perfmodel.roofline import (
    ACT_BYTES,
    ACT_HIDDEN_FACTOR,
    ACT_INTER_FACTOR,
    NGRAM_STEP_S,
    Roofline,
)

SPEC_METHODS = ("none", "ngram", "suffix", "eagle", "eagle3")
# Draft-free methods: their drafts come from the request's own context (answer.py), so with a request's
# tokens at hand their acceptance is measured on the sim's answer rather than drawn.
LOOKUP_METHODS = ("ngram", "suffix")
# Per-draft-token acceptance when none is given and there is no answer to judge drafts against (the in-process
# estimator): EAGLE heads on chat data accept ~0.6-0.7; prompt lookup on random prompts finds little to copy.
DEFAULT_ACCEPTANCE = {"ngram": 0.3, "suffix": 0.3, "eagle": 0.6, "eagle3": 0.7}
# vLLM's prompt-lookup window when neither bound is set (SpeculativeConfig, 0.26).
DEFAULT_LOOKUP = 5
KV_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16")
QUANTIZATIONS = ("none", "fp8")

# Memory the engine holds besides weights and KV, per GPU: CUDA context, cuBLAS workspaces, allocator
# slack (vLLM's "non-torch memory"), plus captured CUDA graphs and NCCL buffers when they exist.
NON_TORCH_BYTES = 0.75 * GIB
CUDA_GRAPH_BYTES = 0.25 * GIB
NCCL_BYTES = 0.25 * GIB
SAMPLER_BYTES_PER_VOCAB_ROW = 8  # fp32 logits + fp32 probabilities for each of max_concurrency rows

# Engine-neutral parameters the sim accepts but that do not change its timing.
NO_EFFECT_PARAMS = frozenset({
    "expert_parallel", "attention_backend", "scheduler_policy", "async_scheduling", "stream_interval",
    "speculative_draft_path",
})


class SimConfigError(ValueError):
    """Flags the engine refuses before touching a GPU (vLLM raises ValueError for these)."""


class SimStartupError(RuntimeError):
    """Startup failed the way a real engine's would (memory); the message reads like the engine's."""


@dataclass
class SimConfig:
    """Engine configuration, named with servetune's engine-neutral parameter names."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    quantization: str = "none"  # none | fp8 (online, weights)
    kv_cache_dtype: str = "auto"  # auto | fp8
    max_concurrency: int = 256  # vLLM --max-num-seqs
    max_batched_tokens: int = 8192  # vLLM --max-num-batched-tokens
    chunked_prefill: bool = True
    prefix_caching: bool = True
    memory_fraction: float = 0.9  # vLLM --gpu-memory-utilization
    kv_block_size: int = 16
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    speculative_method: str = "none"  # none | ngram | suffix | eagle | eagle3
    speculative_tokens: int = 3
    speculative_acceptance: float | None = None  # None: measured on the answer (lookup), else DEFAULT_ACCEPTANCE
    lookup_step_s: float = NGRAM_STEP_S  # host time of one ngram / suffix proposal step (perfmodel.roofline)
    speculative_lookup_min: int | None = None  # ngram window; unset bounds follow vLLM (5/5, or copy the other)
    speculative_lookup_max: int | None = None
    enforce_eager: bool = False
    cuda_graph_max_batch: int | None = None  # None: vLLM's min(2·max_num_seqs·(1+k), 512)
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, strict: bool = True) -> "SimConfig":
        """From a study's engine-neutral parameter dict. Unknown names raise unless ``strict`` is off;
        known parameters the sim ignores (attention_backend, ...) are dropped."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in params if k not in known and k not in NO_EFFECT_PARAMS)
        if unknown and strict:
            raise SimConfigError(f"parameters the sim does not know: {', '.join(unknown)}")
        kw = {k: v for k, v in params.items() if k in known}
        for k in ("quantization", "kv_cache_dtype", "speculative_method"):
            if kw.get(k) in (None, False):
                kw.pop(k, None)
            elif k in kw:
                kw[k] = str(kw[k]).lower()
        return cls(**kw)

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def spec_enabled(self) -> bool:
        return self.speculative_method != "none"

    @property
    def num_drafts(self) -> int:
        return self.speculative_tokens if self.spec_enabled else 0

    @property
    def acceptance(self) -> float:
        if not self.spec_enabled:
            return 0.0
        if self.speculative_acceptance is not None:
            return self.speculative_acceptance
        return DEFAULT_ACCEPTANCE[self.speculative_method]

    @property
    def lookup_window(self) -> tuple[int, int]:
        """(min, max) n-gram length of prompt lookup, defaulted as vLLM does; suffix matches up to a depth."""
        if self.speculative_method == "suffix":
            return 1, SUFFIX_DEPTH
        lo, hi = self.speculative_lookup_min, self.speculative_lookup_max
        if lo is None:  # one bound given: the window is that length alone
            return (DEFAULT_LOOKUP, DEFAULT_LOOKUP) if hi is None else (hi, hi)
        return lo, (hi if hi is not None else lo)

    @property
    def measures_acceptance(self) -> bool:
        """Drafts judged against each request's answer (lookup methods without a fixed acceptance)."""
        return self.speculative_method in LOOKUP_METHODS and self.speculative_acceptance is None

    def graph_max_batch(self) -> int:
        if self.cuda_graph_max_batch is not None:
            return self.cuda_graph_max_batch
        return min(2 * self.max_concurrency * (1 + self.num_drafts), 512, self.max_batched_tokens)

    def validate(self, shape: ModelShape) -> None:
        """Reject what vLLM rejects at argument/config validation, with its wording where it has one."""
        tp, pp, dp = self.tensor_parallel, self.pipeline_parallel, self.data_parallel
        if min(tp, pp, dp) < 1:
            raise SimConfigError("tensor/pipeline/data parallel sizes must be >= 1")
        if shape.num_heads % tp:
            raise SimConfigError(f"Total number of attention heads ({shape.num_heads}) must be divisible by "
                                 f"tensor parallel size ({tp}).")
        if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
            raise SimConfigError(f"Total number of KV heads ({shape.num_kv_heads}) and tensor parallel size ({tp}) "
                                 "must divide one another.")
        if pp > shape.num_layers:
            raise SimConfigError(f"pipeline parallel size ({pp}) exceeds the number of layers ({shape.num_layers}).")
        if self.quantization not in QUANTIZATIONS:
            raise SimConfigError(f"Unknown quantization method {self.quantization!r}; the sim supports "
                                 f"{', '.join(QUANTIZATIONS)}.")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise SimConfigError(f"Unknown kv cache dtype {self.kv_cache_dtype!r}; choose from {', '.join(KV_DTYPES)}.")
        if self.max_concurrency < 1 or self.max_batched_tokens < 1:
            raise SimConfigError("max_num_seqs and max_num_batched_tokens must be >= 1.")
        if self.max_batched_tokens < self.max_concurrency:
            raise SimConfigError(f"max_num_batched_tokens ({self.max_batched_tokens}) must be greater than or "
                                 f"equal to max_num_seqs ({self.max_concurrency}).")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise SimConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.memory_fraction}.")
        if self.kv_block_size < 1:
            raise SimConfigError(f"block_size must be positive, got {self.kv_block_size}.")
        if not 0.0 <= self.lookup_step_s < 1.0:
            raise SimConfigError(f"lookup step must be in [0, 1000) ms, got {self.lookup_step_s * 1e3:g}.")
        if self.max_model_len is not None:
            if self.max_model_len < 1:
                raise SimConfigError(f"max_model_len must be positive, got {self.max_model_len}.")
            if self.max_model_len > shape.max_position_embeddings:
                raise SimConfigError(
                    f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                    f"max_model_len (max_position_embeddings={shape.max_position_embeddings} in model's config.json).")
            if not self.chunked_prefill and self.max_batched_tokens < self.max_model_len:
                raise SimConfigError(
                    f"max_num_batched_tokens ({self.max_batched_tokens}) is smaller than max_model_len "
                    f"({self.max_model_len}). This effectively limits the maximum sequence length to "
                    "max_num_batched_tokens and makes vLLM reject longer sequences. Please increase "
                    "max_num_batched_tokens or decrease max_model_len.")
        if self.speculative_method not in SPEC_METHODS:
            raise SimConfigError(f"Unknown speculative method {self.speculative_method!r}; choose from "
                                 f"{', '.join(SPEC_METHODS)}.")
        if self.spec_enabled:
            if not 1 <= self.speculative_tokens <= 16:
                raise SimConfigError(f"num_speculative_tokens must be in [1, 16], got {self.speculative_tokens}.")
            if not 0.0 <= self.acceptance < 1.0:
                raise SimConfigError(f"speculative acceptance must be in [0, 1), got {self.acceptance}.")
            if pp > 1:
                raise SimConfigError("Speculative decoding is not supported with pipeline parallelism (pp > 1).")
            lo, hi = self.lookup_window
            if lo < 1 or hi < 1:
                raise SimConfigError("prompt_lookup_min and prompt_lookup_max must be >= 1.")
            if lo > hi:
                raise SimConfigError(f"prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one replica (the fullest pipeline stage) and the KV pool it leaves."""

    gpu_memory_bytes: float
    budget_bytes: float  # memory_fraction · GPU memory: what the engine may take
    weight_bytes_per_gpu: float
    reserve_bytes_per_gpu: float  # activations at the token budget, sampler, non-torch, graphs, NCCL
    kv_bytes_per_token_per_gpu: float
    kv_cache_bytes_per_gpu: float
    num_blocks: int
    block_size: int
    max_model_len: int
    notes: tuple[str, ...] = ()  # warnings worth logging (e.g. a clamped max_model_len)

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_concurrency_at_max_len(self) -> float:
        return self.kv_tokens / self.max_model_len


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def memory_plan(shape: ModelShape, gpu: GpuSpec, cfg: SimConfig) -> MemoryPlan:
    """Where each GPU's memory goes and how many KV tokens remain; raises SimStartupError like vLLM would.

    vLLM: budget = utilization × total; KV = budget − weights − profiled peak activations − non-torch
    memory (− CUDA graphs). The activation peak is profiled with a max_num_batched_tokens dummy batch.
    """
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    layers = math.ceil(shape.num_layers / pp)
    weights = layers * shape.layer_weight_bytes(cfg.quantization) / tp
    if pp == 1:
        weights += (shape.embedding_bytes + shape.lm_head_bytes + shape.hidden_size * shape.base_dtype_bytes) / tp
    else:  # first stage embeds, last stage projects to the vocabulary: the fuller one holds one vocab matrix
        weights += shape.vocab_size * shape.hidden_size * shape.base_dtype_bytes / tp
    tokens = cfg.max_batched_tokens
    activations = tokens * ACT_BYTES * (ACT_HIDDEN_FACTOR * shape.hidden_size
                                        + ACT_INTER_FACTOR * shape.experts_per_token * shape.intermediate_size / tp)
    sampler = cfg.max_concurrency * shape.vocab_size * SAMPLER_BYTES_PER_VOCAB_ROW
    reserve = (NON_TORCH_BYTES + activations + sampler + (0 if cfg.enforce_eager else CUDA_GRAPH_BYTES)
               + (NCCL_BYTES if tp * pp > 1 else 0))
    total = gpu.memory_bytes
    budget = cfg.memory_fraction * total

    if weights + NON_TORCH_BYTES > total:
        raise SimStartupError(
            f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {_gib(weights)} for model weights "
            f"(tp={tp}, pp={pp}, quantization={cfg.quantization}). GPU 0 has a total capacity of {_gib(total)}. "
            "Use more GPUs (tensor/pipeline parallel) or quantize the weights.")
    kv_cache = budget - weights - reserve
    kv_per_token = (2 * layers * shape.kv_heads_per_gpu(tp) * shape.head_dim
                    * shape.kv_dtype_bytes(cfg.kv_cache_dtype))
    num_blocks = int(kv_cache // (kv_per_token * cfg.kv_block_size)) if kv_cache > 0 else 0
    if num_blocks <= 0:
        raise SimStartupError(
            f"ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
            f"initializing the engine. (budget {_gib(budget)} = {cfg.memory_fraction} x {_gib(total)}; weights "
            f"{_gib(weights)}, activations and reserve {_gib(reserve)})")

    notes: list[str] = []
    max_len = cfg.max_model_len or shape.max_position_embeddings
    if cfg.max_model_len is None and not cfg.chunked_prefill and cfg.max_batched_tokens < max_len:
        # vLLM refuses this; the sim serves what it can and says so (prompts longer than the budget get 400).
        notes.append(f"chunked prefill is off and max_num_batched_tokens ({cfg.max_batched_tokens}) < "
                     f"max_model_len ({max_len}): limiting max_model_len to {cfg.max_batched_tokens}")
        max_len = cfg.max_batched_tokens
    kv_tokens = num_blocks * cfg.kv_block_size
    if kv_tokens < max_len:
        raise SimStartupError(
            f"ValueError: To serve at least one request with the model's max seq len ({max_len}), "
            f"({_gib(max_len * kv_per_token)} KV cache is needed, which is larger than the available KV cache "
            f"memory ({_gib(kv_cache)}). Based on the available memory, the estimated maximum model length is "
            f"{kv_tokens}. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
            "initializing the engine.")
    return MemoryPlan(total, budget, weights, reserve, kv_per_token, kv_cache, num_blocks, cfg.kv_block_size,
                      max_len, tuple(notes))


def build_roofline(shape: ModelShape, gpu: GpuSpec, cfg: SimConfig) -> Roofline:
    return Roofline(shape, gpu, tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, quantization=cfg.quantization,
                    kv_cache_dtype=cfg.kv_cache_dtype, speculative_method=cfg.speculative_method,
                    speculative_tokens=cfg.num_drafts, enforce_eager=cfg.enforce_eager,
                    cuda_graph_max_batch=cfg.graph_max_batch(), lookup_step_s=cfg.lookup_step_s)
