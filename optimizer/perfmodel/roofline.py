"""Roofline timing of one engine iteration (one forward pass over a continuous batch).

A step is split into components, and each component costs ``max(FLOPs / achievable FLOP/s,
bytes / achievable bandwidth)``: whichever of math or memory traffic binds it. Components:

* **linear**: every projection of the decoder layers plus the lm_head. Weights are read once per step
  whatever the batch (the reason batching pays), activations stream per token; FLOPs are 2 per MAC.
  MoE reads only the experts the step's tokens route to (expected distinct experts for T tokens).
* **attention**: QKᵀ/AV FLOPs over (query, key) pairs; bytes are the KV each sequence reads (its whole
  context, every step: the reason long contexts slow decode) plus the new KV written.
* **tensor-parallel communication**: two all-reduces per layer (after attention and after the MLP), ring
  cost ``latency + 2(tp-1)/tp · bytes / link``.
* **overhead**: scheduling, launch and sampling on the host, ~1 ms with CUDA graphs, more when a batch
  runs eagerly (mixed prefill batches attention-eager under piecewise graphs, oversized batches fully).

Weights and KV heads are split by tp (KV heads replicate once tp exceeds them). Pipeline parallelism is
modelled as vLLM runs it: the batch is cut into ``pp`` micro-batches that flow through ``pp`` stages each
holding ``layers/pp``; a step ends when every micro-batch has crossed every stage, so compute-bound work
scales with stages while a decode step stays as slow as one GPU reading all weights, plus p2p sends and a
bubble for stage imbalance. Speculative decoding adds the drafter's cost (EAGLE: one decoder layer + the
lm_head run k times; ngram: a CPU lookup) while the verifier's k+1 query tokens per sequence ride in the
normal linear/attention terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from servetune.optimizer.perfmodel.hardware import GpuSpec
from servetune.optimizer.perfmodel.model_shapes import ModelShape

# Host-side cost of one iteration with CUDA graphs (schedule, prepare inputs, launch, sample): vLLM V1
# spends ~0.5-1.5 ms here on 8B-class models.
STEP_OVERHEAD_S = 1.0e-3
# Extra kernel-launch cost per decoder layer when a batch runs without CUDA graphs (~10 kernels × 4 µs).
EAGER_PER_LAYER_S = 40e-6
# Piecewise graphs leave attention eager for mixed prefill/decode batches: this share of the eager cost.
PIECEWISE_EAGER_SHARE = 0.3
# Per scheduled sequence: block-table updates, output processing, detokenization.
PER_SEQ_S = 3e-6
# Pipeline bubble: idle share of a stage slot per extra stage (uneven micro-batches, sync points).
PP_BUBBLE = 0.15
# EAGLE drafter forward passes are small graphs of their own: launch + sync each.
DRAFT_PASS_OVERHEAD_S = 0.12e-3
# ngram proposer: CPU prompt lookup per step and per sequence (it also disables async scheduling). The default
# is the lookup alone. vLLM 0.26 on an H100 (SmolLM2-135M, 2026-12-06) spent more: its streamed chunks came
# 4.8-5.9 ms apart with ngram against 1.5-1.8 ms without, at 1-8 sequences (V1 runner, async scheduling off, the
# rejection sampler). The sim reproduces that run's ratios at one sequence with 1.5 ms here (the sim's
# --lookup-step-ms 1.5). One point on a tiny model cannot say how much of it is fixed per step on other models,
# so the default stays.
NGRAM_STEP_S = 0.3e-3
NGRAM_PER_SEQ_S = 5e-6
# Activations moved per token per layer, in elements (residual/norm reads+writes ≈ 4·hidden, the MLP's
# gate/up output written and read ≈ 3·intermediate per routed expert). Small next to weights for decode.
ACT_HIDDEN_FACTOR = 4
ACT_INTER_FACTOR = 3
ACT_BYTES = 2  # activations stay bf16 even with fp8 weights


@dataclass(slots=True)
class StepBatch:
    """What one iteration computes, aggregated over its sequences (the scheduler fills it).

    The counts are whole in a step the scheduler runs; a mean step (reports/roofline.py) has fractional ones."""

    decode_seqs: float = 0  # sequences taking a decode (or speculative verify) step
    decode_tokens: float = 0  # their query tokens: 1 each, 1 + drafts with speculation
    decode_context: float = 0  # Σ KV tokens those sequences attend over
    decode_pairs: float = 0.0  # Σ (query, key) pairs of decode attention
    prefill_seqs: float = 0  # sequences computing a prompt chunk
    prefill_tokens: float = 0  # new prompt tokens computed (prefix-cache hits excluded)
    prefill_context: float = 0  # Σ KV tokens prefill chunks read (cached prefix + the chunk)
    prefill_pairs: float = 0.0  # Σ chunk·prefix + chunk·(chunk+1)/2 (causal)
    sampled: float = 0  # rows that go through the lm_head (decode query tokens + finished prompts)
    draft_seqs: float = 0  # sequences the drafter proposes for
    draft_tokens: float = 0  # Σ draft tokens proposed (k each, fewer near max_tokens)

    @classmethod
    def of(cls, decode_contexts: Iterable[int] = (), prefills: Iterable[tuple[int, int]] = (),
           drafts: int = 0) -> "StepBatch":
        """From per-sequence numbers: each decoding sequence's context (KV tokens already cached), each
        prompt chunk as ``(new tokens, cached prefix tokens)`` (assumed to end its prompt, so it samples),
        and ``drafts`` speculative tokens verified per decoding sequence. Same sums as the scheduler's."""
        b = cls()
        n = 1 + drafts
        for ctx in decode_contexts:
            b.decode_seqs += 1
            b.decode_tokens += n
            b.decode_context += ctx
            b.decode_pairs += n * ctx + n * (n + 1) / 2
            b.sampled += n
            if drafts:
                b.draft_seqs += 1
                b.draft_tokens += drafts
        for chunk, prefix in prefills:
            b.prefill_seqs += 1
            b.prefill_tokens += chunk
            b.prefill_context += prefix
            b.prefill_pairs += chunk * prefix + chunk * (chunk + 1) / 2
            b.sampled += 1
        return b

    @property
    def tokens(self) -> float:
        return self.decode_tokens + self.prefill_tokens

    @property
    def seqs(self) -> float:
        return self.decode_seqs + self.prefill_seqs


@dataclass(frozen=True, slots=True)
class StepTime:
    total_s: float
    linear_s: float
    attention_s: float
    comm_s: float
    draft_s: float
    overhead_s: float


class Roofline:
    """Step-time model of one engine replica (tp × pp GPUs). Construct once, call :meth:`step_time` per step."""

    def __init__(self, shape: ModelShape, gpu: GpuSpec, *, tp: int = 1, pp: int = 1,
                 quantization: str = "none", kv_cache_dtype: str = "auto",
                 speculative_method: str = "none", speculative_tokens: int = 0,
                 enforce_eager: bool = False, cuda_graph_max_batch: int = 512,
                 lookup_step_s: float = NGRAM_STEP_S):
        if tp < 1 or pp < 1:
            raise ValueError("tensor and pipeline parallel sizes must be >= 1")
        self.shape, self.gpu, self.tp, self.pp = shape, gpu, tp, pp
        self.quantization = quantization
        self.spec_method = speculative_method
        self.spec_tokens = speculative_tokens if speculative_method != "none" else 0
        self.enforce_eager = enforce_eager
        self.cuda_graph_max_batch = cuda_graph_max_batch
        self.lookup_step_s = lookup_step_s

        s = shape
        wq = s.weight_dtype_bytes(quantization)
        base = s.base_dtype_bytes
        # fp8 weights on a GPU without fp8 tensor cores are upcast in the GEMM: bytes shrink, math does not.
        fp8_math = quantization.lower() == "fp8" and gpu.has_fp8
        self.linear_flops_rate = gpu.achievable_flops(fp8=fp8_math)
        self.attn_flops_rate = gpu.achievable_flops(fp8=False)
        self.bw = gpu.achievable_bandwidth
        self.link = gpu.achievable_link
        self.link_latency = gpu.link_latency_us * 1e-6

        # The slowest stage: ceil(layers/pp) layers and the lm_head (last stage).
        self.layers_per_stage = math.ceil(s.num_layers / pp)
        L = self.layers_per_stage
        self.lm_head_params = s.vocab_size * s.hidden_size
        self.router_params = s.hidden_size * s.num_experts if s.is_moe else 0
        # Per GPU of the stage (÷ tp): matmul parameters one token touches, and weight bytes.
        self.active_params_gpu = L * (s.active_linear_params_per_layer + self.router_params) / tp
        self.lm_head_params_gpu = self.lm_head_params / tp
        self.attn_weight_bytes_gpu = L * (s.attention_params_per_layer * wq + s.other_params_per_layer * base) / tp
        self.expert_bytes_gpu = L * s.expert_params * wq / tp
        self.lm_head_bytes_gpu = self.lm_head_params * base / tp
        self.act_bytes_per_token_gpu = L * ACT_BYTES * (
            ACT_HIDDEN_FACTOR * s.hidden_size + ACT_INTER_FACTOR * s.experts_per_token * s.intermediate_size / tp)
        # KV of one token on one GPU of the stage, and attention FLOPs per (query, key) pair.
        self.kv_bytes_per_token_gpu = (2 * L * s.kv_heads_per_gpu(tp) * s.head_dim
                                       * s.kv_dtype_bytes(kv_cache_dtype))
        self.attn_flops_per_pair_gpu = 4 * L * s.num_heads * s.head_dim / tp
        # One all-reduce moves T·hidden bf16 values; ring algorithm factor 2(tp-1)/tp.
        self.allreduce_bytes_per_token = s.hidden_size * ACT_BYTES * (2 * (tp - 1) / tp if tp > 1 else 0)
        # EAGLE drafter: one decoder layer of the target's width (dense MLP) + the shared lm_head.
        self.draft_params_gpu = (s.attention_params_per_layer + s.expert_params + self.lm_head_params) / tp
        self.draft_bytes_gpu = ((s.attention_params_per_layer + s.expert_params) * base
                                + self.lm_head_params * base) / tp
        self.draft_kv_bytes_per_token_gpu = 2 * s.kv_heads_per_gpu(tp) * s.head_dim * s.kv_dtype_bytes(kv_cache_dtype)

    def _linear(self, tokens: float, sampled: float) -> float:
        s = self.shape
        flops = 2.0 * (tokens * self.active_params_gpu + sampled * self.lm_head_params_gpu)
        if s.is_moe:
            # Expected distinct experts a layer's T tokens route to (top-k of E, uniform routing).
            e, k = s.num_experts, s.experts_per_token
            touched = e * (1.0 - (1.0 - k / e) ** tokens) if tokens > 0 else 0.0
            weights = self.attn_weight_bytes_gpu + touched * self.expert_bytes_gpu
        else:
            weights = self.attn_weight_bytes_gpu + self.expert_bytes_gpu
        read = weights + (self.lm_head_bytes_gpu if sampled > 0 else 0.0) + tokens * self.act_bytes_per_token_gpu
        return max(flops / self.linear_flops_rate, read / self.bw)

    def _attention(self, tokens: float, pairs: float, context: float) -> float:
        flops = pairs * self.attn_flops_per_pair_gpu
        traffic = (context + tokens) * self.kv_bytes_per_token_gpu  # read every context, write new KV
        return max(flops / self.attn_flops_rate, traffic / self.bw)

    def _allreduce(self, tokens: float) -> float:
        if self.tp == 1:
            return 0.0
        per = self.link_latency + tokens * self.allreduce_bytes_per_token / self.link
        return 2 * self.layers_per_stage * per

    def _draft(self, b: StepBatch) -> float:
        if not b.draft_seqs:
            return 0.0
        if self.spec_method in ("ngram", "suffix"):  # CPU lookups over each request's context
            return self.lookup_step_s + NGRAM_PER_SEQ_S * b.draft_seqs
        # EAGLE: k sequential passes, each over draft_seqs tokens attending over their contexts.
        passes = max(1, round(b.draft_tokens / b.draft_seqs))
        n = b.draft_seqs
        flops = 2.0 * n * self.draft_params_gpu
        read = self.draft_bytes_gpu + b.decode_context * self.draft_kv_bytes_per_token_gpu
        one = max(flops / self.linear_flops_rate, read / self.bw) + self._allreduce(n) / self.layers_per_stage
        return passes * (one + DRAFT_PASS_OVERHEAD_S)

    def _overhead(self, b: StepBatch) -> float:
        eager = EAGER_PER_LAYER_S * self.shape.num_layers
        t = STEP_OVERHEAD_S + PER_SEQ_S * b.seqs
        if self.enforce_eager or b.tokens > self.cuda_graph_max_batch:
            return t + eager
        if b.prefill_tokens:
            return t + PIECEWISE_EAGER_SHARE * eager
        return t

    def step_time(self, b: StepBatch) -> StepTime:
        """Wall time of one iteration of this replica."""
        m = self.pp  # micro-batches in flight, one per stage
        tokens = b.tokens / m
        linear = self._linear(tokens, b.sampled / m)
        attention = self._attention(tokens, (b.decode_pairs + b.prefill_pairs) / m,
                                    (b.decode_context + b.prefill_context) / m)
        comm = self._allreduce(tokens)
        stage = linear + attention + comm
        if m > 1:
            p2p = (m - 1) * (self.link_latency + tokens * self.shape.hidden_size * ACT_BYTES / self.link)
            scale = m + PP_BUBBLE * (m - 1)
            core = stage * scale + p2p
            linear, attention, comm = linear * scale, attention * scale, comm * scale + p2p
        else:
            core = stage
        draft = self._draft(b)
        overhead = self._overhead(b)
        return StepTime(core + draft + overhead, linear, attention, comm, draft, overhead)
