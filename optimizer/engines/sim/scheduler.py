"""Continuous batching, emulated: the part of an inference engine that decides what each step computes.

Pure Python with no clock and no asyncio, so the HTTP server drives it in real time and ``estimate.py``
drives it in virtual time with the same code. It imitates vLLM V1's scheduler:

* a step has a token budget (``max_batched_tokens``) shared by decodes (1 token each, 1 + drafts with
  speculation) and prompt chunks; running sequences are served first, in admission order, then waiting
  ones are admitted FCFS while there is budget, a ``max_concurrency`` slot and KV blocks;
* with chunked prefill off, a prompt must fit the budget whole and prefills get steps of their own,
  ahead of decodes (the older behaviour that makes inter-token latency spike when prompts arrive);
* KV is paged in blocks allocated as sequences grow. When a running sequence needs a block and none is
  free, the most recently admitted sequence is preempted (freed, re-queued first, recomputed later), so
  the cache is never over-allocated;
* prefix caching hashes full prompt blocks (chained, like vLLM) once they are computed; a new request
  reuses the longest cached prefix and skips its compute. Freed cached blocks stay reusable until a new
  allocation evicts them, least recently freed first.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from servetune.optimizer.engines.sim.answer import SUFFIX_DEPTH
from servetune.optimizer.perfmodel.hardware import GIB, GpuSpec
from servetune.optimizer.perfmodel.model_shapes import ModelShape
from servetune.optimizer.perfmodel.roofline import (
    ACT_BYTES,
    ACT_HIDDEN_FACTOR,
    ACT_INTER_FACTOR,
    Roofline,
    StepBatch,
    StepTime,
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
                    cuda_graph_max_batch=cfg.graph_max_batch())


WAITING, RUNNING, FINISHED = 0, 1, 2


@dataclass(eq=False, slots=True)
class SimRequest:
    """One sequence. ``tokens`` are its prompt token identities (ids or words) for prefix caching; None
    means "unique prompt" and skips hashing."""

    rid: int
    prompt_len: int
    max_tokens: int
    arrival: float = 0.0
    tokens: Sequence[Any] | None = None
    stop_at: int | None = None  # natural end (EOS) before max_tokens, when the client does not ignore EOS
    # progress (the scheduler owns these)
    state: int = WAITING
    computed: int = 0  # tokens whose KV is in the cache
    output: int = 0  # tokens emitted
    num_blocks: int = 0  # KV blocks held; the first len(cached) are shared prefix-cache blocks
    cached: list = field(default_factory=list)
    hashes: list | None = None  # chained hashes of full prompt blocks, computed on first admission
    hit_tokens: int = 0
    preemptions: int = 0
    finish_reason: str | None = None
    # timestamps, set by whoever drives the clock
    first_token_time: float | None = None
    finish_time: float | None = None
    user: Any = None  # the server's stream state
    answer: Any = None  # answer.Answer: the tokens this request will emit (drafts are judged against them)


@dataclass
class SchedulerStats:
    steps: int = 0
    busy_s: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    spec_drafts: int = 0  # draft tokens proposed (vLLM's num_draft_tokens)
    spec_accepted: int = 0
    spec_num_drafts: int = 0  # verifications that carried at least one draft token (vLLM's num_drafts)
    spec_accepted_per_pos: list = field(default_factory=list)  # [i]: drafts whose token i was accepted
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    running_sum: int = 0  # Σ running sequences over steps (mean batch = running_sum / steps)


@dataclass(slots=True)
class StepResult:
    duration_s: float
    emitted: list  # [(SimRequest, tokens emitted this step)]
    finished: list  # [SimRequest] that finished this step
    batch: StepBatch
    time: StepTime


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """One engine replica's continuous-batching scheduler and KV block pool."""

    def __init__(self, shape: ModelShape, gpu: GpuSpec, cfg: SimConfig, *, plan: MemoryPlan | None = None,
                 seed: int | None = None):
        cfg.validate(shape)
        self.shape, self.gpu, self.cfg = shape, gpu, cfg
        self.plan = plan or memory_plan(shape, gpu, cfg)
        self.roofline = build_roofline(shape, gpu, cfg)
        self.block_size = cfg.kv_block_size
        self.num_blocks = self.plan.num_blocks
        self.max_model_len = self.plan.max_model_len
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.free_plain = self.num_blocks  # free blocks holding no cached prefix
        self.cache_ref: dict[Any, int] = {}  # block hash -> sequences using it (0 = cached but free)
        self.evictable: OrderedDict[Any, None] = OrderedDict()  # cached, free blocks in eviction order
        self.rng = random.Random(cfg.seed if seed is None else seed)
        self.stats = SchedulerStats()
        self._drafts = cfg.num_drafts
        self._accept = cfg.acceptance
        self._lookup = cfg.measures_acceptance
        self._adaptive = cfg.speculative_method == "suffix"
        self.stats.spec_accepted_per_pos = [0] * self._drafts

    # -- queue -----------------------------------------------------------------------------------------
    def add(self, req: SimRequest) -> None:
        if req.prompt_len < 1:
            raise ValueError("prompt must have at least one token")
        if req.prompt_len + req.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({req.prompt_len}) + max_tokens ({req.max_tokens}) exceeds max_model_len "
                             f"({self.max_model_len})")
        req.state = WAITING
        self.waiting.append(req)

    def abort(self, req: SimRequest) -> None:
        """Drop a request (client went away) and give its blocks back."""
        if req.state == RUNNING:
            self.running.remove(req)
            self._free(req)
        elif req.state == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        else:
            return
        req.state = FINISHED
        req.finish_reason = "abort"
        self.stats.finished["abort"] += 1

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_plain - len(self.evictable)

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.num_blocks

    # -- blocks ----------------------------------------------------------------------------------------
    def _available(self) -> int:
        return self.free_plain + len(self.evictable)

    def _take(self, n: int) -> None:
        if n <= self.free_plain:
            self.free_plain -= n
            return
        n -= self.free_plain
        self.free_plain = 0
        for _ in range(n):  # reuse the least recently freed cached blocks, forgetting their prefixes
            h, _ = self.evictable.popitem(last=False)
            del self.cache_ref[h]

    def _free(self, req: SimRequest) -> None:
        self.free_plain += req.num_blocks - len(req.cached)
        # Tail blocks first, so a prefix's deepest blocks are evicted before its root (vLLM order).
        for h in reversed(req.cached):
            r = self.cache_ref[h] - 1
            self.cache_ref[h] = r
            if r == 0:
                self.evictable[h] = None
        req.cached = []
        req.num_blocks = 0

    def _block_hashes(self, req: SimRequest) -> list:
        if req.hashes is None:
            toks, bs, h, out = req.tokens, self.block_size, None, []
            assert toks is not None  # the callers hash only requests that carry their prompt's tokens
            for i in range(0, (req.prompt_len // bs) * bs, bs):
                h = hash((h, tuple(toks[i:i + bs])))
                out.append(h)
            req.hashes = out
        return req.hashes

    def _register(self, req: SimRequest) -> None:
        """Publish the request's newly computed full prompt blocks to the prefix cache."""
        full = min(req.computed, req.prompt_len) // self.block_size
        have = len(req.cached)
        if full <= have:
            return
        hashes = self._block_hashes(req)
        for i in range(have, full):
            h = hashes[i]
            r = self.cache_ref.get(h)
            if r is None:
                self.cache_ref[h] = 1
            else:  # someone computed it too: share theirs, free ours
                if r == 0:
                    del self.evictable[h]
                self.cache_ref[h] = r + 1
                self.free_plain += 1
            req.cached.append(h)

    def _preempt_last(self) -> SimRequest:
        victim = self.running.pop()
        self._free(victim)
        victim.computed = 0
        victim.state = WAITING
        victim.preemptions += 1
        self.waiting.appendleft(victim)
        self.stats.preemptions += 1
        return victim

    # -- scheduling ------------------------------------------------------------------------------------
    def _schedule_running(self, sched: list, budget: int) -> tuple[int, bool]:
        bs, running = self.block_size, self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = req.prompt_len + req.output - req.computed
            drafts = 0
            proposal = None
            decode = n == 1 and req.output > 0
            if decode and self._drafts:
                room = max(0, min(self._drafts, req.max_tokens - req.output - 1, budget - 1))
                if self._lookup and req.answer is not None:
                    proposal = req.answer.propose(room, self._adaptive) if room else []
                    drafts = len(proposal)
                else:
                    drafts = room
                n += drafts
            elif n > budget:
                n = budget  # a prompt chunk (only running prompts exist with chunked prefill)
            need = _cdiv(req.computed + n, bs) - req.num_blocks
            if need > 0:  # most decode steps stay inside their last block
                while need > self.free_plain + len(self.evictable):
                    victim = self._preempt_last()
                    preempted = True
                    if victim is req:
                        break
                if req.state != RUNNING:
                    continue  # it preempted itself; nothing after it is left either
                self._take(need)
                req.num_blocks += need
            sched.append((req, n, drafts, decode, proposal))
            budget -= n
            i += 1
        return budget, preempted

    def _admit(self, sched: list, budget: int, chunked: bool) -> int:
        bs, cfg = self.block_size, self.cfg
        cache_on = cfg.prefix_caching
        while self.waiting and budget > 0 and len(self.running) < cfg.max_concurrency:
            req = self.waiting[0]
            hits: list = []
            if cache_on and req.tokens is not None and req.computed == 0:
                hashes = self._block_hashes(req)
                limit = (req.prompt_len - 1) // bs  # at least one prompt token must be computed
                cache_ref = self.cache_ref
                for h in hashes[:limit]:
                    if h not in cache_ref:
                        break
                    hits.append(h)
            hit_tokens = len(hits) * bs
            n = req.prompt_len + req.output - hit_tokens
            if n > budget:
                if not chunked:
                    break  # whole prompts only: wait for a step with room
                n = budget
            need = _cdiv(hit_tokens + n, bs) - len(hits)
            pinned = sum(1 for h in hits if self.cache_ref[h] == 0)  # hits now sitting in the free pool
            if need > self._available() - pinned:
                break
            for h in hits:
                r = self.cache_ref[h]
                if r == 0:
                    del self.evictable[h]
                self.cache_ref[h] = r + 1
            self._take(need)
            req.cached = hits
            req.num_blocks = len(hits) + need
            req.computed = hit_tokens
            if cache_on and req.preemptions == 0:
                self.stats.prefix_queries += req.prompt_len
                self.stats.prefix_hits += hit_tokens
                req.hit_tokens = hit_tokens
            self.waiting.popleft()
            req.state = RUNNING
            self.running.append(req)
            sched.append((req, n, 0, False, None))
            budget -= n
        return budget

    def step(self) -> StepResult | None:
        """Schedule and account one iteration. Returns None when there is nothing to run.

        State advances immediately (tokens are 'computed'); callers stamp emissions at now + duration_s.
        """
        if not self.running and not self.waiting:
            return None
        cfg = self.cfg
        budget = cfg.max_batched_tokens
        sched: list = []
        if cfg.chunked_prefill:
            budget, preempted = self._schedule_running(sched, budget)
            if not (preempted and sched):
                self._admit(sched, budget, chunked=True)
        else:
            if self.waiting and len(self.running) < cfg.max_concurrency:
                self._admit(sched, budget, chunked=False)  # a prefill-only step
            if not sched:
                self._schedule_running(sched, budget)
                if not sched and self.waiting:
                    self._admit(sched, budget, chunked=False)
        if not sched:
            return None

        b = StepBatch()
        for req, n, drafts, decode, proposal in sched:
            pairs = n * req.computed + n * (n + 1) / 2
            if decode:
                b.decode_seqs += 1
                b.decode_tokens += n
                b.decode_context += req.computed
                b.decode_pairs += pairs
                b.sampled += n
                if drafts or proposal is not None:  # a lookup proposer runs for every decode, match or not
                    b.draft_seqs += 1
                    b.draft_tokens += drafts
            else:
                b.prefill_seqs += 1
                b.prefill_tokens += n
                b.prefill_context += req.computed
                b.prefill_pairs += pairs
                if req.computed + n >= req.prompt_len + req.output:
                    b.sampled += 1
        t = self.roofline.step_time(b)

        st = self.stats
        emitted: list = []
        finished: list = []
        rng, p = self.rng, self._accept
        cache_on = cfg.prefix_caching
        for req, n, drafts, decode, proposal in sched:
            if req.state != RUNNING:
                continue
            if decode:
                accepted = 0
                if proposal is not None:  # the draft is right up to its first token the answer does not have
                    answer = req.answer
                    while accepted < drafts and proposal[accepted] == answer.token(req.output + accepted):
                        accepted += 1
                else:
                    while accepted < drafts and rng.random() < p:
                        accepted += 1
                if drafts:
                    st.spec_drafts += drafts
                    st.spec_accepted += accepted
                    st.spec_num_drafts += 1
                    per_pos = st.spec_accepted_per_pos
                    for j in range(accepted):
                        per_pos[j] += 1
                req.computed += 1 + accepted  # rejected drafts' KV is discarded
                emit = 1 + accepted
            else:
                req.computed += n
                emit = 1 if req.computed >= req.prompt_len + req.output else 0
                if cache_on and req.tokens is not None:
                    self._register(req)
            if not emit:
                continue
            end = req.max_tokens if req.stop_at is None else min(req.max_tokens, req.stop_at)
            emit = min(emit, end - req.output)
            if req.output == 0:
                st.prompt_tokens += req.prompt_len
            req.output += emit
            if req.answer is not None:
                req.answer.advance(emit)
            st.generation_tokens += emit
            emitted.append((req, emit))
            if req.output >= end:
                req.finish_reason = "length" if req.output >= req.max_tokens else "stop"
                req.state = FINISHED
                st.finished[req.finish_reason] += 1
                self._free(req)
                finished.append(req)
        if finished:
            self.running = [r for r in self.running if r.state == RUNNING]
        st.steps += 1
        st.busy_s += t.total_s
        st.running_sum += len(sched)
        return StepResult(t.total_s, emitted, finished, b, t)
