"""The vLLM adapter: `vllm serve MODEL [flags]` from search_spaces/vllm.yaml, vLLM's pre-launch rules, its
failure signatures and its /metrics.

Targets vLLM 0.26.0 (the gpu-kit's pin); the catalog's ``versions:`` block covers 0.33. Rules and messages
follow ../shared/reference/engine-knobs.md §1, §3 and §5, checked against the 0.26.0 source
(vllm/config/{scheduler,speculative,vllm,model,cache}.py, vllm/engine/arg_utils.py,
vllm/v1/attention/backends/*.py, vllm/v1/core/kv_cache_utils.py, vllm/v1/worker/utils.py).
"""
from __future__ import annotations

import os
from typing import Any

from packaging.version import InvalidVersion, Version

from servetune.optimizer import secret_refs
from servetune.optimizer.catalog import coerce
from servetune.optimizer.engines import common as C
from servetune.optimizer.engines import disturbances as D
from servetune.optimizer.engines.base import CatalogEngine, Failure, FailureKind, ModelRef
from servetune.optimizer.engines.classify import Rule, classify_with
from servetune.optimizer.engines.prometheus import parse_prometheus
from servetune.optimizer.engines.registry import register
from servetune.optimizer.engines.vllm_metrics import VLLM_SPLIT, summarize_vllm_metrics, vllm_audit_counters
from servetune.optimizer.perfmodel import memory as M
from servetune.optimizer.perfmodel.hardware import compute_capability

# `--speculative-config.method` values (SpeculativeMethod in vllm/config/speculative.py, 0.26.0).
SPEC_METHODS_026 = {"ngram", "ngram_gpu", "medusa", "mlp_speculator", "draft_model", "suffix", "custom_class",
                    "eagle", "eagle3", "extract_hidden_states", "mtp", "dflash", "dspark"}
SPEC_REMOVED_033 = {"medusa", "mlp_speculator"}
SPEC_NEEDS_MODEL = {"eagle", "eagle3", "draft_model", "medusa", "mlp_speculator", "dflash"}
SPEC_NGRAM = {"ngram", "ngram_gpu"}
# Methods an explicit --async-scheduling accepts (EagleModelTypes + ngram_gpu + draft_model + dspark).
SPEC_ASYNC_OK = {"eagle", "eagle3", "extract_hidden_states", "mtp", "dflash", "ngram_gpu", "draft_model", "dspark"}
# Speculative children: which ones each method reads. The rest are dropped from argv (see launch_params).
SPEC_CHILDREN = ("speculative_tokens", "speculative_lookup_max", "speculative_lookup_min", "speculative_draft_path")
# API-server (frontend) flags, not EngineArgs: Ray Serve LLM runs its own OpenAI front end.
FRONTEND_ONLY = {"--disable-uvicorn-access-log", "--disable-log-requests", "--enable-log-requests", "--api-key",
                 "--enable-metrics"}

KV_DTYPES = {"auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla",
             "fp8_per_token_head", "int8_per_token_head", "int4_per_token_head", "nvfp4"}
SCHED_POLICIES = {"fcfs", "priority"}

# Exact phrases from the 0.26.0 source, most specific first: the first rule that matches the log wins.
VLLM_RULES: list[Rule] = [
    (FailureKind.OOM, r"torch\.OutOfMemoryError|CUDA out of memory",
     "CUDA out of memory while loading, profiling or capturing graphs: lower memory_fraction, "
     "max_concurrency or max_batched_tokens, quantize, or shard wider"),
    (FailureKind.OOM, r"No available memory for the cache blocks",
     "weights and activations leave no memory for the KV cache: raise memory_fraction, quantize or shard wider"),
    (FailureKind.OOM, r"To serve at least one request with the model's max seq len",
     "the KV cache cannot hold one max_model_len sequence: lower max_model_len, use fp8 KV, "
     "raise memory_fraction or shard wider"),
    (FailureKind.OOM, r"Free memory on device .* is less than desired GPU memory utilization",
     "less GPU memory was free at startup than memory_fraction asks for: another process holds memory, "
     "or memory_fraction is too high"),
    (FailureKind.CRASH, r"CUDA error: an illegal memory access",
     "a GPU worker hit an illegal memory access (seen with TP>1 on hosts with NVLink multicast off, where "
     "FlashInfer's fused all-reduce picked its multicast 'mnnvl' backend)"),
    (FailureKind.CRASH, r"CUDA error: ", "a GPU worker died of a CUDA error"),
    (FailureKind.BAD_ARGS, r"error: unrecognized arguments",
     "vLLM does not know a flag: the installed version differs from the catalog's (run servetune's version check)"),
    (FailureKind.BAD_ARGS, r"error: ambiguous option",
     "a flag is an ambiguous prefix of several vLLM flags"),
    (FailureKind.BAD_ARGS, r"error: argument \S+: invalid",
     "vLLM does not accept a flag's value"),
    (FailureKind.BAD_ARGS, r"World size \(\d+\) is larger than the number of available GPUs",
     "tensor_parallel·pipeline_parallel is more than the GPUs the engine can see"),
    (FailureKind.BAD_ARGS, r"must be divisible by tensor parallel size",
     "tensor_parallel does not divide the model's attention heads"),
    (FailureKind.BAD_ARGS, r"Number of experts in the model must be greater than 0",
     "expert_parallel on a model without experts"),
    (FailureKind.BAD_ARGS, r"max_num_batched_tokens \(\d+\) is smaller than max_model_len",
     "with chunked_prefill off, max_batched_tokens must be at least max_model_len"),
    (FailureKind.BAD_ARGS, r"must be greater than or equal to max_num_seqs",
     "max_batched_tokens is below max_concurrency"),
    (FailureKind.BAD_ARGS, r"async scheduling is only supported",
     "async_scheduling=true with a speculative method that cannot overlap: leave async_scheduling unset"),
    (FailureKind.BAD_ARGS, r"Quantization method specified in the model config",
     "quantization does not match the checkpoint's own quantization"),
    (FailureKind.BAD_ARGS, r"Cannot find the config file for",
     "quantization needs a checkpoint quantized that way"),
    (FailureKind.UNSUPPORTED, r"Arctic Inference is required for suffix decoding",
     "speculative_method=suffix needs the arctic-inference package in vLLM's environment (vLLM 0.26 asks for "
     "0.1.1, which PyPI has as a source release only for Python 3.12)"),
    (FailureKind.UNSUPPORTED, r"Selected backend .* is not valid for this configuration|No valid attention backend",
     "the attention backend cannot run this configuration (kv_cache_dtype, kv_block_size or GPU)"),
    (FailureKind.UNSUPPORTED, r"NotImplementedError",
     "vLLM does not implement this combination"),
    (FailureKind.BAD_ARGS, r"ValidationError|Value error,",
     "vLLM's config validation refused this combination"),
    (FailureKind.TIMEOUT, r"Timed out waiting for engine core processes to start",
     "the engine core did not start within VLLM_ENGINE_READY_TIMEOUT_S"),
    (FailureKind.BAD_ARGS, r"\bValueError\b",
     "vLLM rejected a value"),
    (FailureKind.CRASH, r"Engine core initialization failed",
     "the engine core died during startup"),
]


# Every post-warm-up kernel compile logged, not a kernel's first only (see VLLM_DISTURBANCES). On the H200
# (docs/results/2026-12-04-h200-trust2) each mixtral launch's first measured level failed p99 TTFT with 2 s
# outliers and a clean log after a warm-up that had logged fused_moe_kernel once: a later fused_moe shape
# compiling unlogged is what this flag makes visible. It logs only when something compiles, so a warm
# server pays nothing for it. A measurement flag: exports leave it out (Engine.measurement_flags).
JIT_MONITOR_VERBOSE = "--jit-monitor-verbose"
JIT_MONITOR_SINCE = (0, 26)  # the first release with the flag (vllm/config/observability.py)


def _version_at_least(version: str, least: tuple[int, ...]) -> bool:
    nums = []
    for part in str(version).split(".")[:len(least)]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            return False
        nums.append(int(digits))
    return tuple(nums) >= least


def _multicast_off() -> bool:
    return os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1"


def _without_allreduce_fusion(extra_args: list[str]) -> list[str]:
    """Turn off the compiled all-reduce + RMSNorm fusion, unless the study sets a compilation config itself.

    On a 4×H200 host with NVLink multicast off, vLLM 0.26 at TP=2 crashed with it on (FlashInfer picked its
    multicast backend), then, with the trtllm backend forced, hung for minutes after Dynamo; with the fusion
    off the same trial served 64 req/s within the llama3.1-8b SLA (docs/results/2026-11-22-h200x4-sglang-tp2-fp8).
    The key is 0.26's (``PassConfig.fuse_allreduce_rms``); other releases are left as they are.
    """
    if any(a == "-cc" or a.startswith(("--compilation-config", "-cc=", "-cc.")) for a in extra_args):
        return extra_args
    return extra_args + ["--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}']


# Log lines that disturb a measured level (engines.disturbances). vLLM's jit_monitor warns when a Triton
# (or TileLang, CuTeDSL) kernel compiles after warm-up, e.g. "(EngineCore_DP0 pid=1234) WARNING 12-04
# 10:11:12 [jit_monitor.py:135] Triton kernel JIT compilation during inference: fused_moe_kernel. This causes a
# latency spike; ...". By default it warns once per kernel name (``logger.warning_once``, an lru_cache on the
# message and its arguments, vllm/utils/jit_monitor.py in 0.26.0), so a second shape of a kernel already named
# compiles silently; servetune launches vLLM with --jit-monitor-verbose (JIT_MONITOR_VERBOSE) so that every
# compile is logged, with its constexprs and key. vLLM v1 logs no preemption (the counter counts them); the v0
# wording is kept for older servers.
VLLM_DISTURBANCES = (
    D.sig("jit", r"JIT compilation during inference", True),
    D.TRITON_AUTOTUNE,
    D.TORCH_RECOMPILE,
    D.FLASHINFER_JIT,
    D.sig("preemption", r"is preempted by PreemptionMode", False),
)


@register("vllm")
class VllmEngine(CatalogEngine):
    display_name = "vLLM"
    # vLLM 0.26 8B on H200: 61-94 s warm, 152 s cold (docs/results/2026-11-22-*)
    start_s = (60.0, 155.0)
    image = "vllm/vllm-openai:v{version}"
    pip_package = "vllm"
    helm_template = "helm-production-stack.yaml.j2"  # vLLM's production-stack chart
    help_args = ("--help=all",)  # plain --help shows only the group summaries
    metrics_prefix = "vllm:"
    kv_usage_metric = "vllm:kv_cache_usage_perc"
    disturbances = VLLM_DISTURBANCES
    measurement_flags = (JIT_MONITOR_VERBOSE,)

    # -- launch ----------------------------------------------------------------------------------------
    def plan(self, params: dict[str, Any], model: ModelRef, **kw):
        tp = C.as_int(self.launch_params(params).get("tensor_parallel"), 1)
        if tp > 1 and _multicast_off() and self.version.startswith("0.26"):
            kw["extra_args"] = _without_allreduce_fusion(list(kw.get("extra_args") or []))
        return super().plan(params, model, **kw)

    def span_nodes_args(self) -> list[str]:
        # vLLM's Ray executor joins the cluster named by RAY_ADDRESS and makes its own placement group of
        # tensor_parallel x pipeline_parallel GPUs, the first on the node its API server runs on
        return ["--distributed-executor-backend", "ray"]

    def launch_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """What reaches argv: speculative children only when a method uses them (an ngram trial in a study
        that also searches a draft path must not carry the path; a method of none carries nothing)."""
        p = dict(params)
        method = p.get("speculative_method")
        if C.is_off(method):
            for child in SPEC_CHILDREN:
                p.pop(child, None)
            return p
        method = str(method).lower()
        if method not in SPEC_NGRAM:
            p.pop("speculative_lookup_max", None)
            p.pop("speculative_lookup_min", None)
        if method in SPEC_NGRAM or method in ("suffix", "mtp", "dspark", "extract_hidden_states"):
            p.pop("speculative_draft_path", None)
        return p

    def model_flags(self, model: ModelRef) -> list[str]:
        argv = ["--load-format", model.load_format] if model.load_format else []
        # Every /metrics and /health poll and every request would otherwise add an access-log line and push
        # the root cause of a crash out of the log tail (FrontendArgs.disable_uvicorn_access_log, 0.26/0.33).
        argv.append("--disable-uvicorn-access-log")
        if _version_at_least(self.version, JIT_MONITOR_SINCE):
            argv.append(JIT_MONITOR_VERBOSE)
        return argv

    def base_env(self) -> dict[str, str]:
        wanted = {
            "HF_HUB_OFFLINE": "1",  # never download: trials must load what is on disk
            "VLLM_NO_USAGE_STATS": "1",
            "NCCL_NVLS_ENABLE": "0",  # NVLink multicast off (the GPU hosts' rule)
            # vLLM's own engine handshake gives up at 600 s by default; servetune's ready timeout governs.
            "VLLM_ENGINE_READY_TIMEOUT_S": "1800",
            # vLLM logs to stdout, block-buffered into engine.log otherwise: the level audit attributes a log
            # line (a kernel JIT) to the level whose window it was written in, so it must land when written
            "PYTHONUNBUFFERED": "1",
        }
        if _multicast_off():
            # With NVLink multicast off, TP>1 workers die in the profile run with an illegal memory access in
            # torch's CUDASymmetricMemory (docs/results/2026-11-22-vllm-h200, twice). The second time the log
            # named the culprit: the compiled all-reduce + RMSNorm fusion had FlashInfer auto-select its
            # multicast "mnnvl" backend. trtllm is the single-node backend vLLM itself falls back to where
            # multicast is missing; the symm-mem all-reduce needs multicast too.
            wanted["VLLM_ALLREDUCE_USE_SYMM_MEM"] = "0"
            wanted["VLLM_FLASHINFER_ALLREDUCE_BACKEND"] = "trtllm"
        return wanted

    def endpoints(self) -> dict[str, Any]:
        # /health answers 200 only once the engine is up (the socket is bound earlier); a cold torch.compile
        # of a 70B model takes ~4 min (reference §5).
        return {"health_path": "/health", "metrics_path": "/metrics", "ready_timeout_s": 1800.0}

    # -- rules -----------------------------------------------------------------------------------------
    def check(self, params: dict[str, Any], model: ModelRef, *, gpu: str, gpu_memory_gib: float,
              gpus_available: int) -> list[str]:
        shape = model.shape or {}
        p = self.launch_params(params)
        r: list[str] = []
        pp = C.as_int(p.get("pipeline_parallel"), 1)
        r += C.quantization_rules(p, shape, "vLLM")
        r += C.block_quant_rule(p, shape)
        if C.truthy(p.get("expert_parallel")) and not C.is_moe(shape):
            r.append("expert_parallel=true needs a mixture-of-experts model; this one has no experts "
                     "(vLLM: 'Number of experts in the model must be greater than 0')")
        r += self._value_rules(p, shape)
        batch = self.resolve_batch(p, shape, gpu, gpu_memory_gib)
        r += self._batch_rules(p, shape, batch)
        r += self._spec_rules(p, shape, pp, batch)
        r += self._kernel_rules(p, gpu)
        return r

    def _value_rules(self, p: dict[str, Any], shape: dict[str, Any]) -> list[str]:
        r = []
        frac = p.get("memory_fraction")
        if frac is not None and not 0 < float(frac) <= 1:
            r.append(f"memory_fraction={frac} must be in (0, 1]")
        kv = p.get("kv_cache_dtype")
        if kv is not None and str(kv) not in KV_DTYPES:
            r.append(f"kv_cache_dtype={kv} is not one of vLLM's: {', '.join(sorted(KV_DTYPES))}")
        pol = p.get("scheduler_policy")
        if pol is not None and str(pol) not in SCHED_POLICIES:
            r.append(f"scheduler_policy={pol} is not one of vLLM's: fcfs, priority")
        bs = p.get("kv_block_size")
        if bs is not None and C.as_int(bs, 0) <= 0:
            r.append(f"kv_block_size={bs} must be a positive number of tokens")
        mml = p.get("max_model_len")
        derived = shape.get("max_position_embeddings")
        if mml is not None and isinstance(derived, int) and C.as_int(mml, 0) > derived:
            r.append(f"max_model_len={mml} exceeds the model's {derived} positions "
                     "(vLLM refuses it unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
        for k in ("max_concurrency", "max_batched_tokens", "stream_interval", "cuda_graph_max_batch"):
            if p.get(k) is not None and C.as_int(p[k], 0) < 1:
                r.append(f"{k}={p[k]} must be at least 1")
        return r

    def resolve_batch(self, p: dict[str, Any], shape: dict[str, Any], gpu: str,
                      gpu_memory_gib: float) -> tuple[int, int, bool]:
        """(max_num_batched_tokens, max_num_seqs, tokens_explicit) as vLLM resolves them
        (EngineArgs._set_default_max_num_seqs_and_batched_tokens_args). A value equal to the catalog
        default counts as the engine's own default: the driver merges catalog defaults into ``p``."""
        big = gpu_memory_gib >= 70 and "a100" not in str(gpu).lower()
        d_tokens, d_seqs = (8192, 1024) if big else (2048, 256)
        cat = self.catalog.params
        mml = C.max_model_len_of(p, shape)
        tokens = p.get("max_batched_tokens")
        seqs = p.get("max_concurrency")
        tokens_explicit = tokens is not None and tokens != getattr(cat.get("max_batched_tokens"), "default", None)
        seqs_explicit = seqs is not None and seqs != getattr(cat.get("max_concurrency"), "default", None)
        s = C.as_int(seqs, d_seqs) if seqs_explicit else d_seqs
        if tokens_explicit:
            t = C.as_int(tokens, d_tokens)
        else:
            t = d_tokens
            if not C.truthy(p.get("chunked_prefill", True)):
                t = max(mml, t)
            t = min(s * mml, t)
        if not seqs_explicit:
            s = min(s, t)
        return t, s, tokens_explicit

    def _batch_rules(self, p: dict[str, Any], shape: dict[str, Any], batch: tuple[int, int, bool]) -> list[str]:
        tokens, seqs, tokens_explicit = batch
        mml = C.max_model_len_of(p, shape)
        r = []
        if tokens < seqs:
            r.append(f"max_batched_tokens={tokens} is below max_concurrency={seqs}: vLLM needs "
                     "max_num_batched_tokens >= max_num_seqs")
        if not C.truthy(p.get("chunked_prefill", True)) and tokens_explicit and tokens < mml:
            r.append(f"chunked_prefill=false needs max_batched_tokens >= max_model_len, but "
                     f"max_batched_tokens={tokens} < max_model_len={mml}")
        return r

    def _spec_rules(self, p: dict[str, Any], shape: dict[str, Any], pp: int,
                    batch: tuple[int, int, bool]) -> list[str]:
        method = p.get("speculative_method")
        if C.is_off(method):
            return []
        m = str(method).lower()
        r = []
        if m not in SPEC_METHODS_026:
            return [f"speculative_method={m} is not a vLLM method ({', '.join(sorted(SPEC_METHODS_026))})"]
        if m in SPEC_REMOVED_033 and _at_least(self.version, "0.33"):
            r.append(f"speculative_method={m} was removed in vLLM 0.33")
        if pp > 1:
            r.append(f"pipeline_parallel={pp} with speculative_method={m}: vLLM breaks at runtime "
                     "(reference §3 rule 5); use pipeline_parallel=1")
        k = p.get("speculative_tokens")
        if k is None and m != "suffix":  # suffix drafts up to suffix_decoding_max_tree_depth (24) when unset
            r.append(f"speculative_method={m} needs speculative_tokens (vLLM: 'num_speculative_tokens was "
                     "provided but without speculative model' / required when no draft config sets it)")
        elif k is not None and C.as_int(k, 0) < 1:
            r.append(f"speculative_tokens={k} must be at least 1")
        if m in SPEC_NEEDS_MODEL and C.is_off(p.get("speculative_draft_path")):
            r.append(f"speculative_method={m} needs speculative_draft_path (the draft / EAGLE head checkpoint)")
        if m == "mtp" and not any(C.as_int(shape.get(key), 0) > 0 for key in
                                  ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_modules")):
            r.append("speculative_method=mtp needs MTP layers in the checkpoint; this model has none")
        if m in SPEC_NGRAM:
            lo, hi = p.get("speculative_lookup_min"), p.get("speculative_lookup_max")
            for name, v in (("speculative_lookup_min", lo), ("speculative_lookup_max", hi)):
                if v is not None and C.as_int(v, 0) < 1:
                    r.append(f"{name}={v} must be at least 1")
            if lo is not None and hi is not None and C.as_int(lo, 0) > C.as_int(hi, 0):
                r.append(f"speculative_lookup_min={lo} must be <= speculative_lookup_max={hi}")
        if p.get("async_scheduling") is not None and C.truthy(p["async_scheduling"]) and m not in SPEC_ASYNC_OK:
            r.append(f"async_scheduling=true with speculative_method={m}: vLLM only overlaps scheduling for "
                     "EAGLE/MTP/draft-model/ngram_gpu drafts (ValueError); leave async_scheduling unset "
                     "or use ngram_gpu")
        if m == "draft_model":
            t, s, _ = batch  # max_num_scheduled_tokens = tokens - seqs·1 must stay positive (reference §3 rule 16)
            if t - s <= 0:
                r.append(f"speculative_method=draft_model reserves one slot per sequence: max_batched_tokens={t} "
                         f"must exceed max_concurrency={s}")
        return r

    def _kernel_rules(self, p: dict[str, Any], gpu: str) -> list[str]:
        r = []
        backend = p.get("attention_backend")
        backend = None if backend in (None, "auto") else str(
            self.catalog.params["attention_backend"].values.get(str(backend), backend)).upper()
        kv = str(p.get("kv_cache_dtype") or "auto")
        sm = compute_capability(gpu)
        if kv.startswith("fp8") and backend:
            if backend == "FLASH_ATTN" and (kv == "fp8_e5m2" or (sm is not None and sm != 90)):
                where = "e5m2" if kv == "fp8_e5m2" else f"a {gpu} (SM{sm})"
                r.append(f"kv_cache_dtype={kv} with attention_backend=FLASH_ATTN: FlashAttention takes fp8 KV "
                         f"only as FA3 e4m3 on SM90, not {where}; use FLASHINFER or TRITON_ATTN")
            if backend == "FLEX_ATTENTION":
                r.append(f"kv_cache_dtype={kv} with attention_backend=FLEX_ATTENTION: it has no fp8 KV cache")
        bs = p.get("kv_block_size")
        if bs is not None and backend:
            b = C.as_int(bs, 0)
            if backend in ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION") and b % 16:
                r.append(f"kv_block_size={b} with attention_backend={backend}: it needs a multiple of 16")
            if backend == "FLASHINFER" and b not in (16, 32, 64) and not (sm is not None and sm >= 100):
                r.append(f"kv_block_size={b} with attention_backend=FLASHINFER: it takes 16, 32 or 64")
        return r

    def check_memory(self, params: dict[str, Any], model: ModelRef, *, gpu: str,
                     gpu_memory_gib: float) -> list[str]:
        """vLLM gives the KV cache memory_fraction·memory minus weights, the profiled activation peak and
        non-torch memory, and refuses to start unless it holds one max_model_len sequence."""
        gib = gpu_memory_gib
        if not gib or gib <= 0:
            return []
        shape = model.shape or {}
        p = self.launch_params(params)
        tp = C.as_int(p.get("tensor_parallel"), 1)
        pp = C.as_int(p.get("pipeline_parallel"), 1)
        dp = C.as_int(p.get("data_parallel"), 1)
        quant = C.effective_quant(p, shape)
        w = M.weights_per_gpu(shape, quant, tp, pp, dp, C.truthy(p.get("expert_parallel")))
        per_tok = M.kv_bytes_per_token_per_gpu(shape, p.get("kv_cache_dtype"), tp, pp)
        if w is None or per_tok is None:
            return []
        frac = float(p.get("memory_fraction") or 0.92)
        budget = frac * gib * M.GIB
        tokens, _, _ = self.resolve_batch(p, shape, gpu, gib)
        act = M.activation_floor_bytes(shape, tokens, tp)
        kv = budget - w - act
        mml = C.max_model_len_of(p, shape)
        need = mml * per_tok
        q = quant or "none"
        if kv <= 0:
            return [f"weights need {M.fmt_gib(w)} per GPU (quantization={q}, tensor_parallel={tp}, "
                    f"pipeline_parallel={pp}) plus at least {M.fmt_gib(act)} of activations, more than "
                    f"memory_fraction={frac:g} of {gib:g} GiB ({M.fmt_gib(budget)}): no memory left for KV; "
                    "shard wider or quantize"]
        if kv < need:
            return [f"one max_model_len={mml} sequence needs {M.fmt_gib(need)} of KV per GPU "
                    f"(kv_cache_dtype={p.get('kv_cache_dtype') or 'auto'}) but at most {M.fmt_gib(kv)} is left "
                    f"after weights ({M.fmt_gib(w)}) within memory_fraction={frac:g} of {gib:g} GiB: lower "
                    "max_model_len, use fp8 KV, shard wider or raise memory_fraction"]
        return []

    # -- failures and metrics --------------------------------------------------------------------------
    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        f = classify_with(VLLM_RULES, log_tail, exit_code)
        if f.kind == FailureKind.CRASH:  # a generic crash line: say what the engine core actually raised
            root = C.last_exception(log_tail, skip=r"Engine core initialization failed")
            if root and root not in f.reason:
                f = Failure(f.kind, f"{f.reason}: {root}")
        return f

    def parse_metrics(self, text: str) -> dict[str, float]:
        return parse_prometheus(text, split=VLLM_SPLIT)

    def metrics_delta(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return summarize_vllm_metrics(before, after)

    def audit_counters(self, metrics: dict[str, float]) -> dict[str, float]:
        return vllm_audit_counters(metrics)

    # -- deployment ------------------------------------------------------------------------------------
    def ray_serve_engine_kwargs(self, args: list[str]) -> tuple[dict[str, Any], list[str]]:
        """vLLM flags → ``EngineArgs`` keyword names (what Ray Serve LLM's ``engine_kwargs`` takes); a flag
        that carries a secret is left out with a warning (Ray has no secret interpolation)."""
        args = list(args[1:])  # model first
        for f in ("--host", "--port", "--served-model-name"):
            while f in args:
                k = args.index(f)
                del args[k: k + 2]
        out: dict[str, Any] = {}
        warnings: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if not a.startswith("--"):
                i += 1
                continue
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            if a in FRONTEND_ONLY:
                i += 2 if takes_value else 1
                continue
            if takes_value and secret_refs.WHOLE_REF.match(args[i + 1]):
                warnings.append(f"ray-serve: {a} takes a secret; left out of engine_kwargs (set it on the cluster)")
                i += 2
                continue
            key = a[2:]
            if "=" in key:
                key, val = key.split("=", 1)
                takes_value = False
                value: Any = coerce(val)
            elif takes_value:
                value = coerce(args[i + 1])
            elif key.startswith("no-"):
                key, value = key[3:], False
            else:
                value = True
            if "." in key:  # --speculative-config.method ngram -> speculative_config: {method: ngram}
                head, sub = key.split(".", 1)
                out.setdefault(head.replace("-", "_"), {})[sub] = value
            else:
                out[key.replace("-", "_")] = value
            i += 2 if takes_value else 1
        return out, warnings


def _at_least(version: str, floor: str) -> bool:
    try:
        return Version(version) >= Version(floor)
    except InvalidVersion:
        return False
