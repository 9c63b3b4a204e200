"""The SGLang adapter: `python3 -m sglang.launch_server --model-path M [flags]` from
search_spaces/sglang.yaml, SGLang's pre-launch rules, its failure signatures and its /metrics.

Targets SGLang 0.5.17 (the gpu-kit's pin); the catalog's ``versions:`` block covers 0.5.20+. Rules and
messages follow ../shared/reference/engine-knobs.md §2, §3 (rules 1-5, 21-31) and §5, checked against the
0.5.17 source (sglang/srt/server_args.py, arg_groups/speculative_hook.py, arg_groups/overrides.py,
model_executor/pool_configurator.py, entrypoints/engine.py, observability/metrics_collector.py).
"""
from __future__ import annotations

from typing import Any

from packaging.version import InvalidVersion, Version

from servetune.optimizer.engines import common as C
from servetune.optimizer.engines import disturbances as D
from servetune.optimizer.engines.base import CatalogEngine, Failure, FailureKind, ModelRef
from servetune.optimizer.engines.classify import Rule, classify_with
from servetune.optimizer.engines.prometheus import counter_delta, finite_rounded, ratio
from servetune.optimizer.engines.registry import register
from servetune.optimizer.perfmodel import memory as M

# Neutral speculative_method -> what SGLang runs. NEXTN is an alias of EAGLE (MTP heads in the checkpoint).
SPEC_ALGOS = {"ngram": "NGRAM", "eagle": "EAGLE", "eagle3": "EAGLE3", "draft_model": "STANDALONE", "mtp": "NEXTN"}
EAGLE_FAMILY = {"EAGLE", "EAGLE3", "NEXTN", "STANDALONE"}
# Architectures whose checkpoint carries its own MTP draft (speculative_hook._handle_eagle_family).
MTP_ARCHS = {"DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV4ForCausalLM", "Glm4MoeForCausalLM",
             "Glm4MoeLiteForCausalLM", "GlmMoeDsaForCausalLM", "BailingMoeForCausalLM", "BailingMoeV2ForCausalLM",
             "BailingMoeV2_5ForCausalLM", "MistralLarge3ForCausalLM", "PixtralForConditionalGeneration",
             "HYV3ForCausalLM"}
# _auto_choose_speculative_params: these get (5 steps, topk 4, 8 draft tokens) when nothing is set.
AUTO_TREE_ARCHS = {"LlamaForCausalLM", "Grok1ForCausalLM", "Grok1VForCausalLM"}
NGRAM_DEFAULT_TOPK = 10  # --speculative-ngram-max-bfs-breadth, which NGRAM uses as its topk
PAGE_TREE_BACKENDS = ("fa3", "flashinfer", "triton")
KV_DTYPES = {"auto", "fp8_e4m3", "fp8_e5m2", "bf16", "bfloat16", "mxfp8", "nvfp4", "fp4_mx_block16", "fp4_e2m1"}
SCHED_POLICIES = {"0.5.17": {"fcfs", "lpm", "dfs-weight", "lof", "random", "priority", "routing-key"},
                  "0.5.20": {"hrrn"}, "0.5.23": {"shortest-prefill-first"}}  # each release adds to the last
SPEC_CHILDREN = ("speculative_tokens", "speculative_lookup_max", "speculative_lookup_min",
                 "speculative_draft_path", "speculative_topk", "speculative_draft_tokens")

# Root causes first (their traceback precedes the generic "scheduler died" / "Initialization failed").
SGLANG_RULES: list[Rule] = [
    (FailureKind.OOM, r"Not enough memory\. Please try to increase --mem-fraction-static",
     "weights leave no room for the KV pool: raise memory_fraction, quantize or shard wider"),
    (FailureKind.OOM, r"Capture cuda graph failed",
     "out of memory while capturing CUDA graphs: lower memory_fraction or cuda_graph_max_batch"),
    (FailureKind.OOM, r"Memory pool size is too small",
     "the KV pool is too small for even one request: raise memory_fraction, quantize or shard wider"),
    (FailureKind.OOM, r"torch\.OutOfMemoryError|CUDA out of memory",
     "CUDA out of memory: lower memory_fraction, max_concurrency or max_batched_tokens, quantize or shard wider"),
    (FailureKind.BAD_ARGS, r"error: ambiguous option",
     "a flag is an ambiguous prefix of several SGLang flags (e.g. --cuda-graph-max-bs from 0.5.20)"),
    (FailureKind.BAD_ARGS, r"error: unrecognized arguments",
     "SGLang does not know a flag: the installed version differs from the catalog's (run servetune's version check)"),
    (FailureKind.BAD_ARGS, r"error: argument \S+: invalid",
     "SGLang does not accept a flag's value"),
    (FailureKind.BAD_ARGS, r"Pipeline parallelism is not compatible with overlap schedule, speculative decoding",
     "pipeline_parallel > 1 cannot run with speculative decoding"),
    (FailureKind.BAD_ARGS, r"chunked_prefill_size must be divisible by page_size",
     "max_batched_tokens (chunked prefill size) must be a multiple of kv_block_size (page size)"),
    (FailureKind.BAD_ARGS, r"speculative_eagle_topk.*page_size|topk\s*>\s*1 with page_size",
     "speculative tree (topk > 1) with kv_block_size > 1 needs another attention backend"),
    (FailureKind.UNSUPPORTED, r"NotImplementedError",
     "SGLang does not implement this combination"),
    (FailureKind.BAD_ARGS, r"\bAssertionError\b",
     "SGLang's argument checks refused this combination"),
    (FailureKind.BAD_ARGS, r"\bValueError\b",
     "SGLang rejected a value"),
    (FailureKind.INTERNAL, r"The memory capacity is unbalanced",
     "another process holds GPU memory (servetune should have waited for the GPUs to be free)"),
    (FailureKind.CRASH, r"scheduler died during initialization \(exit code: -9\)",
     "a scheduler process was SIGKILLed during startup, most likely by the host's OOM killer"),
    (FailureKind.CRASH, r"Initialization failed\. warmup error",
     "the warm-up request failed"),
    (FailureKind.CRASH, r"Scheduler hit an exception",
     "the scheduler crashed"),
    (FailureKind.CRASH, r"Health check failed",
     "the server stopped answering its health check"),
    (FailureKind.CRASH, r"scheduler died during initialization|Initialization failed",
     "a scheduler process died during startup"),
    (FailureKind.CRASH, r"Received sigquit from a child process",
     "a child process (scheduler / detokenizer) failed"),
]


# Log lines that disturb a measured level (engines.disturbances). SGLang compiles its Triton kernels on
# first use without a log line; what it does log: FlashInfer's JIT, torch.compile's recompile limit, the
# scheduler's retraction ("KV cache pool is full. Retract requests. #retracted_reqs: 1, ...") and, in older
# versions, "Decode out of memory happened" before it retracts.
SGLANG_DISTURBANCES = (
    D.TORCH_RECOMPILE,
    D.FLASHINFER_JIT,
    D.sig("preemption", r"KV cache pool is full\. Retract requests", False),
    D.sig("oom_retry", r"(?:Decode|Prefill) out of memory happened", False),
)


@register("sglang")
class SglangEngine(CatalogEngine):
    display_name = "SGLang"
    # SGLang 0.5.17 8B on H200: 58-67 s warm, 123 s cold (docs/results/2026-11-22-*)
    start_s = (55.0, 125.0)
    image = "lmsysorg/sglang:v{version}-cu129"
    pip_package = "sglang"
    metrics_prefix = "sglang:"
    kv_usage_metric = "sglang:token_usage"
    disturbances = SGLANG_DISTURBANCES

    # -- launch ----------------------------------------------------------------------------------------
    def plan(self, params: dict[str, Any], model: ModelRef, *, extra_args: list[str] | None = None, **kw):
        # /metrics exists only with --enable-metrics; servetune always scrapes it.
        return super().plan(params, model, extra_args=["--enable-metrics", *(extra_args or [])], **kw)

    def neutral_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """--ep-size N reads back as the neutral boolean (N > 1: EP across the TP group)."""
        p = dict(params)
        ep = p.get("expert_parallel")
        if isinstance(ep, int) and not isinstance(ep, bool):
            p["expert_parallel"] = ep > 1
        return p

    def launch_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Neutral parameters as SGLang needs them spelled out:
        - expert_parallel true -> --ep-size = tensor_parallel (false -> not passed, ep 1);
        - chunked_prefill false -> --chunked-prefill-size -1, so max_batched_tokens is dropped;
        - speculative_tokens k: EAGLE family / STANDALONE -> steps k, topk 1, draft tokens k+1 (the chain that
          equals vLLM's k; SGLang asserts that topk/draft tokens never come without steps); NGRAM -> draft
          tokens k (the engine derives steps); children of an unused method are dropped."""
        p = dict(params)
        ep = p.pop("expert_parallel", None)
        if C.truthy(ep):
            p["expert_parallel"] = C.as_int(p.get("tensor_parallel"), 1)
        if "chunked_prefill" in p and not C.truthy(p["chunked_prefill"]):
            p.pop("max_batched_tokens", None)
        method = p.get("speculative_method")
        if C.is_off(method):
            for child in SPEC_CHILDREN:
                p.pop(child, None)
            return p
        algo = SPEC_ALGOS.get(str(method).lower(), str(method).upper())
        p.pop("speculative_lookup_max", None)
        p.pop("speculative_lookup_min", None)
        k = p.get("speculative_tokens")
        if algo == "NGRAM":
            p.pop("speculative_draft_path", None)
            p.pop("speculative_topk", None)
            if k is not None:
                p.setdefault("speculative_draft_tokens", p.pop("speculative_tokens"))
        elif algo in EAGLE_FAMILY and k is not None:
            topk = C.as_int(p.get("speculative_topk"), 1)
            p["speculative_topk"] = topk
            if topk == 1 or p.get("speculative_draft_tokens") is None:
                # topk 1: SGLang forces draft tokens to steps + 1 anyway; a tree without a width gets the
                # practical upper bound topk·steps + 1 (reference §2)
                p["speculative_draft_tokens"] = C.as_int(k, 1) + 1 if topk == 1 else C.as_int(k, 1) * topk + 1
        return p

    def model_flags(self, model: ModelRef) -> list[str]:
        return ["--load-format", model.load_format] if model.load_format else []

    def base_env(self) -> dict[str, str]:
        # unbuffered: the level audit attributes a log line to the level whose window it was written in
        wanted = {"HF_HUB_OFFLINE": "1", "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
        return wanted

    def endpoints(self) -> dict[str, Any]:
        # /health is 503 until the warm-up request has run; /v1/models answers 200 before the model is
        # ready, so it is not a readiness probe (reference §5).
        return {"health_path": "/health", "metrics_path": "/metrics", "ready_timeout_s": 1800.0}

    # -- rules -----------------------------------------------------------------------------------------
    def check(self, params: dict[str, Any], model: ModelRef, *, gpu: str, gpu_memory_gib: float,
              gpus_available: int) -> list[str]:
        shape = model.shape or {}
        raw = dict(params)
        p = self.launch_params(params)
        r: list[str] = []
        pp = C.as_int(p.get("pipeline_parallel"), 1)
        r += C.quantization_rules(p, shape, "SGLang")
        r += C.block_quant_rule(p, shape)
        if C.truthy(raw.get("expert_parallel")) and not C.is_moe(shape):
            r.append("expert_parallel=true on a model without experts: SGLang's --ep-size only shards MoE "
                     "experts, so the trial would repeat expert_parallel=false")
        if ":" in (model.name or ""):
            r.append(f"served model name {model.name!r} contains ':', which SGLang reserves for LoRA adapters")
        r += self._value_rules(p, shape)
        r += self._chunk_rules(raw, p, gpu_memory_gib)
        r += self._spec_rules(raw, p, shape, pp)
        return r

    def _value_rules(self, p: dict[str, Any], shape: dict[str, Any]) -> list[str]:
        r = []
        frac = p.get("memory_fraction")
        if frac is not None and not 0 < float(frac) < 1:
            r.append(f"memory_fraction={frac} must be in (0, 1): it is weights + KV pool as a share of all memory")
        kv = p.get("kv_cache_dtype")
        if kv is not None:
            kv_s = str(self.catalog.params["kv_cache_dtype"].values.get(str(kv), kv))
            if kv_s not in KV_DTYPES:
                r.append(f"kv_cache_dtype={kv} is not one of SGLang's: fp8 (= fp8_e4m3), "
                         f"{', '.join(sorted(KV_DTYPES))}")
        pol = p.get("scheduler_policy")
        if pol is not None and str(pol) not in self._policies():
            r.append(f"scheduler_policy={pol} is not one of SGLang {self.version}'s: "
                     f"{', '.join(sorted(self._policies()))}")
        bs = p.get("kv_block_size")
        if bs is not None and C.as_int(bs, 0) <= 0:
            r.append(f"kv_block_size={bs} must be a positive number of tokens")
        mml = p.get("max_model_len")
        derived = shape.get("max_position_embeddings")
        if mml is not None and isinstance(derived, int) and C.as_int(mml, 0) > derived:
            r.append(f"max_model_len={mml} exceeds the model's {derived} positions (SGLang refuses it unless "
                     "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1)")
        for k in ("max_concurrency", "stream_interval", "cuda_graph_max_batch"):
            if p.get(k) is not None and C.as_int(p[k], 0) < 1:
                r.append(f"{k}={p[k]} must be at least 1")
        return r

    def _policies(self) -> set[str]:
        out: set[str] = set()
        for v, extra in SCHED_POLICIES.items():
            try:
                if Version(self.version) >= Version(v):
                    out |= extra
            except InvalidVersion:
                out |= SCHED_POLICIES["0.5.17"]
        return out or SCHED_POLICIES["0.5.17"]

    def default_chunk(self, gpu_memory_gib: float) -> int:
        """--chunked-prefill-size by GPU memory (ServerArgs._handle_gpu_memory_settings, 0.5.17)."""
        mb = gpu_memory_gib * 1024
        return 2048 if mb < 35 * 1024 else 4096 if mb < 60 * 1024 else 8192 if mb < 160 * 1024 else 16384

    def resolve_chunk(self, raw: dict[str, Any], gpu_memory_gib: float) -> int:
        """The prefill chunk SGLang will use: -1 when chunked prefill is off; the catalog default (which the
        driver merges in) stands for the engine's GPU-dependent default."""
        if "chunked_prefill" in raw and not C.truthy(raw["chunked_prefill"]):
            return -1
        v = raw.get("max_batched_tokens")
        default = getattr(self.catalog.params.get("max_batched_tokens"), "default", None)
        if v is None or v == default:
            return self.default_chunk(gpu_memory_gib or 80)
        return C.as_int(v, 0)

    def _chunk_rules(self, raw: dict[str, Any], p: dict[str, Any], gib: float) -> list[str]:
        chunk = self.resolve_chunk(raw, gib)
        page = C.as_int(p.get("kv_block_size"), 1)
        if chunk == 0 or chunk < -1:
            return [f"max_batched_tokens={raw.get('max_batched_tokens')} must be positive "
                    "(turn chunked prefill off with chunked_prefill=false)"]
        if chunk > 0 and page > 0 and chunk % page:
            return [f"max_batched_tokens={chunk} (the prefill chunk) must be divisible by kv_block_size={page} "
                    "(SGLang: 'chunked_prefill_size must be divisible by page_size')"]
        return []

    def _spec_rules(self, raw: dict[str, Any], p: dict[str, Any], shape: dict[str, Any], pp: int) -> list[str]:
        method = p.get("speculative_method")
        if C.is_off(method):
            return []
        m = str(method).lower()
        algo = SPEC_ALGOS.get(m, m.upper())
        r = []
        if algo not in EAGLE_FAMILY | {"NGRAM", "DFLASH", "DSPARK"}:
            return [f"speculative_method={m} is not an SGLang algorithm (ngram, eagle, eagle3, draft_model, mtp)"]
        if pp > 1:
            r.append(f"pipeline_parallel={pp} with speculative_method={m}: SGLang asserts 'Pipeline parallelism "
                     "is not compatible with overlap schedule, speculative decoding'")
        k = raw.get("speculative_tokens")
        if k is not None and C.as_int(k, 0) < 1:
            r.append(f"speculative_tokens={k} must be at least 1")
        arch = (shape.get("architectures") or [""])[0]
        if algo in EAGLE_FAMILY and C.is_off(p.get("speculative_draft_path")) and not (
                algo in ("EAGLE", "NEXTN") and arch in MTP_ARCHS):
            r.append(f"speculative_method={m} needs speculative_draft_path (SGLang requires a draft model for "
                     f"{algo} unless the checkpoint carries MTP layers)")
        backend = p.get("attention_backend")
        backend = None if backend in (None, "auto") else str(
            self.catalog.params["attention_backend"].values.get(str(backend), backend))
        if algo == "NGRAM":
            topk = NGRAM_DEFAULT_TOPK
        elif p.get("speculative_topk") is not None:
            topk = C.as_int(p["speculative_topk"], 1)
        else:  # no speculative_tokens: SGLang picks (steps, topk, draft) itself, a tree for Llama / Grok
            topk = 4 if algo != "STANDALONE" and arch in AUTO_TREE_ARCHS else 1
        page = C.as_int(p.get("kv_block_size"), 1)
        if backend == "flex_attention":
            r.append("speculative decoding with attention_backend=flex_attention: SGLang asserts it is unsupported")
        if topk > 1 and backend == "trtllm_mha":
            r.append(f"attention_backend=trtllm_mha supports only a speculative topk of 1 (here {topk})")
        if topk > 1 and page > 1 and backend is not None:
            allowed = ("flashinfer",) if algo == "NGRAM" else PAGE_TREE_BACKENDS
            if backend not in allowed:
                r.append(f"speculative_method={m} drafts a tree (topk {topk}) and kv_block_size={page} > 1: "
                         f"SGLang supports that only with attention_backend {' / '.join(allowed)}, not {backend}")
        return r

    def auto_memory_fraction(self, raw: dict[str, Any], gib: float, tp: int, pp: int) -> float:
        """--mem-fraction-static when unset (ServerArgs._handle_gpu_memory_settings, 0.5.17):
        (memory - reserved) / memory, reserved = 512 MB + 1.5 MB per chunk token + tp·pp/8 GB + 2 MB per decode
        graph batch, at least 10 GB on GPUs over 60 GB."""
        mb = gib * 1024
        chunk = self.resolve_chunk(raw, gib)
        tokens = max(chunk, 2048) if chunk > 0 else max(16384, 2048)
        max_bs = C.as_int(raw.get("cuda_graph_max_batch"), 0) or (
            8 if mb < 20 * 1024 else (24 if tp < 4 else 80) if mb < 35 * 1024 else (32 if tp < 4 else 160)
            if mb < 60 * 1024 else (256 if tp < 4 else 512) if mb < 160 * 1024 else 512)
        graphs = 0 if C.truthy(raw.get("enforce_eager")) else max_bs * 2
        reserved = 512 + tokens * 1.5 + tp * pp / 8 * 1024 + graphs
        if mb > 60 * 1024:
            reserved = max(reserved, 10 * 1024)
        return round((mb - reserved) / mb, 3)

    def check_memory(self, params: dict[str, Any], model: ModelRef, *, gpu: str,
                     gpu_memory_gib: float) -> list[str]:
        """SGLang sizes weights + KV pool as mem_fraction_static·memory ('Not enough memory' if the pool is
        empty); activations and CUDA graphs must fit in the rest."""
        gib = gpu_memory_gib
        if not gib or gib <= 0:
            return []
        shape = model.shape or {}
        raw = dict(params)
        p = self.launch_params(params)
        tp = C.as_int(p.get("tensor_parallel"), 1)
        pp = C.as_int(p.get("pipeline_parallel"), 1)
        dp = C.as_int(p.get("data_parallel"), 1)
        quant = C.effective_quant(p, shape)
        w = M.weights_per_gpu(shape, quant, tp, pp, dp, C.truthy(raw.get("expert_parallel")))
        if w is None:
            return []
        explicit = p.get("memory_fraction") is not None
        frac = float(p["memory_fraction"]) if explicit else self.auto_memory_fraction(raw, gib, tp, pp)
        static = frac * gib * M.GIB
        q = quant or "none"
        if static - w <= 0:
            how = f"memory_fraction={frac:g}" if explicit else f"SGLang's automatic memory_fraction (~{frac:g})"
            return [f"weights need {M.fmt_gib(w)} per GPU (quantization={q}, tensor_parallel={tp}, "
                    f"pipeline_parallel={pp}) but {how} of {gib:g} GiB gives weights + KV only "
                    f"{M.fmt_gib(static)}: no KV pool ('Not enough memory'); shard wider or quantize"]
        if explicit:
            chunk = self.resolve_chunk(raw, gib)
            act = M.activation_floor_bytes(shape, chunk if chunk > 0 else 16384, tp)
            rest = (1 - frac) * gib * M.GIB
            if rest < act:
                return [f"memory_fraction={frac:g} leaves {M.fmt_gib(rest)} of {gib:g} GiB outside weights + KV, "
                        f"less than the {M.fmt_gib(act)} a {max(chunk, 0) or 16384}-token prefill needs at least: "
                        "lower memory_fraction or max_batched_tokens"]
        return []

    # -- failures and metrics --------------------------------------------------------------------------
    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        f = classify_with(SGLANG_RULES, log_tail, exit_code)
        if f.kind == FailureKind.CRASH:  # a generic crash line: say what the scheduler actually raised
            root = C.last_exception(log_tail, skip=r"scheduler died|Initialization failed|Received sigquit")
            if root and root not in f.reason:
                f = Failure(f.kind, f"{f.reason}: {root}")
        return f

    def metrics_delta(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return summarize_sglang_metrics(before, after)

    def audit_counters(self, metrics: dict[str, float]) -> dict[str, float]:
        return sglang_audit_counters(metrics)


# -- /metrics ----------------------------------------------------------------------------------------------
def summarize_sglang_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """SGLang /metrics (``--enable-metrics``) between two scrapes → the same engine-neutral keys as vLLM.

    SGLang retracts (re-queues) requests where vLLM preempts them: both count as ``preemptions``. Its
    speculative acceptance rate is a gauge of the latest logged batch, taken at ``after``; the mean acceptance
    length over the window comes from counters where SGLang has them: every verification call of a request
    emits its accepted drafts plus one token, and each request's first token comes from its prefill, so it is
    (Δgeneration tokens − Δrequests) / Δspec_verify_calls (the gauge otherwise).
    """
    d = lambda n: counter_delta(before, after, n)  # noqa: E731
    hit = ratio(d("sglang:cached_tokens_total"), d("sglang:prompt_tokens_total"))
    if hit is None:
        hit = after.get("sglang:cache_hit_rate")
    pre = d("sglang:num_retracted_requests_total")
    verify, gen, reqs = d("sglang:spec_verify_calls_total"), d("sglang:generation_tokens_total"), \
        d("sglang:num_requests_total")
    mean_len = ratio(None if gen is None or reqs is None else gen - reqs, verify)
    return finite_rounded({
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
