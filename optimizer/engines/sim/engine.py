"""The sim engine's adapter: catalog-driven argv, and its failure messages (which imitate vLLM's)."""
from __future__ import annotations

from typing import Any

from servetune.optimizer.engines.base import CatalogEngine, Failure, FailureKind, ModelRef


class SimEngine(CatalogEngine):
    name = "sim"
    # The sim exposes vLLM's metric names and, with --emulate-jit, logs vLLM's JIT warning.
    kv_usage_metric = "vllm:kv_cache_usage_perc"

    @property
    def disturbances(self) -> tuple:  # type: ignore[override]
        from servetune.optimizer.engines.vllm import VLLM_DISTURBANCES

        return VLLM_DISTURBANCES

    def audit_counters(self, metrics: dict[str, float]) -> dict[str, float]:
        from servetune.optimizer.engines.common import vllm_audit_counters

        return vllm_audit_counters(metrics)

    measurement_flags = ("--jit-monitor-verbose",)

    def model_flags(self, model: ModelRef) -> list[str]:
        return ["--jit-monitor-verbose"]  # as servetune launches vLLM: every emulated compile logged

    def gpu_flags(self, gpu: str, gpu_memory_gib: float | None) -> list[str]:
        argv = ["--gpu", gpu]
        if gpu_memory_gib:
            argv += ["--gpu-memory-gib", str(gpu_memory_gib)]
        return argv

    def endpoints(self) -> dict[str, Any]:
        return {"ready_timeout_s": 60.0}

    def parse_metrics(self, text: str) -> dict[str, float]:
        from servetune.optimizer.engines.common import VLLM_SPLIT
        from servetune.optimizer.engines.prometheus import parse_prometheus

        return parse_prometheus(text, split=VLLM_SPLIT)

    def metrics_delta(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """The sim's raw counters (its own and the vLLM-named ones), plus vLLM's engine-neutral summary of them."""
        from servetune.optimizer.engines.common import summarize_vllm_metrics

        raw = {k: round(after[k] - before.get(k, 0.0), 6) for k in after}
        return {**raw, **summarize_vllm_metrics(before, after)}

    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        from servetune.optimizer.engines.classify import classify_vllm_like

        return classify_vllm_like(log_tail, exit_code)
