"""The sim engine's adapter: catalog-driven argv, and its failure messages (which imitate vLLM's)."""
from __future__ import annotations

from typing import Any

from servetune.optimizer.engines.base import CatalogEngine, Failure, FailureKind, ModelRef


class SimEngine(CatalogEngine):
    name = "sim"

    def model_flags(self, model: ModelRef) -> list[str]:
        return []

    def gpu_flags(self, gpu: str, gpu_memory_gib: float | None) -> list[str]:
        argv = ["--gpu", gpu]
        if gpu_memory_gib:
            argv += ["--gpu-memory-gib", str(gpu_memory_gib)]
        return argv

    def endpoints(self) -> dict[str, Any]:
        return {"ready_timeout_s": 60.0}

    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        from servetune.optimizer.engines.classify import classify_vllm_like

        return classify_vllm_like(log_tail, exit_code)
