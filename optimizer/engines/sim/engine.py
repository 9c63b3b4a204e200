"""The sim engine's adapter: catalog-driven argv, its memory rule, and its failure messages and /metrics
(which imitate vLLM's)."""
from __future__ import annotations

from typing import Any

from servetune.optimizer.engines.base import CatalogEngine, Failure, ModelRef
from servetune.optimizer.engines.classify import classify_vllm_like
from servetune.optimizer.engines.common import as_int
from servetune.optimizer.engines.prometheus import parse_prometheus
from servetune.optimizer.engines.registry import register
from servetune.optimizer.engines.vllm import JIT_MONITOR_VERBOSE, VLLM_DISTURBANCES
from servetune.optimizer.engines.vllm_metrics import VLLM_SPLIT, summarize_vllm_metrics, vllm_audit_counters
from servetune.optimizer.perfmodel.memory import GIB, weight_bytes


@register("sim")
class SimEngine(CatalogEngine):
    simulated = True
    # 1.6-2.1 s alone, 2.5-4.1 s in the quickstart on 2 cores shared with other jobs
    start_s = (1.5, 4.5)
    stop_s = 1.0
    image = "servetune-sim:{version}"  # built from a servetune checkout (export writes the Dockerfile)
    # The sim exposes vLLM's metric names and, with --emulate-jit, logs vLLM's JIT warning.
    metrics_prefix = "vllm:"
    kv_usage_metric = "vllm:kv_cache_usage_perc"
    disturbances = VLLM_DISTURBANCES
    measurement_flags = (JIT_MONITOR_VERBOSE,)

    def model_flags(self, model: ModelRef) -> list[str]:
        return [JIT_MONITOR_VERBOSE]  # as servetune launches vLLM: every emulated compile logged

    def gpu_flags(self, gpu: str, gpu_memory_gib: float | None) -> list[str]:
        argv = ["--gpu", gpu]
        if gpu_memory_gib:
            argv += ["--gpu-memory-gib", str(gpu_memory_gib)]
        return argv

    def endpoints(self) -> dict[str, Any]:
        return {"ready_timeout_s": 60.0}

    def check_memory(self, params: dict[str, Any], model: ModelRef, *, gpu: str,
                     gpu_memory_gib: float) -> list[str]:
        """The weights must fit in memory_fraction of the GPU (the sim refuses to start otherwise)."""
        weights = weight_bytes(model.shape or {}, params.get("quantization"))
        if not weights:
            return []
        tp = as_int(params.get("tensor_parallel"), 1) or 1
        pp = as_int(params.get("pipeline_parallel"), 1) or 1
        fraction = float(params.get("memory_fraction") or self.defaults().get("memory_fraction") or 0.9)
        per_gpu = weights / (tp * pp)
        budget = fraction * gpu_memory_gib * GIB
        if per_gpu >= budget:
            return [f"weights need {per_gpu / GIB:.1f} GiB per GPU but memory_fraction={fraction:g} of "
                    f"{gpu_memory_gib:g} GiB allows {budget / GIB:.1f} GiB: shard wider or quantize"]
        return []

    def parse_metrics(self, text: str) -> dict[str, float]:
        return parse_prometheus(text, split=VLLM_SPLIT)

    def metrics_delta(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """The sim's raw counters (its own and the vLLM-named ones), plus vLLM's engine-neutral summary of them."""
        raw = {k: round(after[k] - before.get(k, 0.0), 6) for k in after}
        return {**raw, **summarize_vllm_metrics(before, after)}

    def audit_counters(self, metrics: dict[str, float]) -> dict[str, float]:
        return vllm_audit_counters(metrics)

    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        return classify_vllm_like(log_tail, exit_code)

    def pip_spec(self, version: str) -> str:
        return "servetune"  # the sim is servetune's own server
