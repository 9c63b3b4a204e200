"""The engine contract. Everything an inference server's flags, logs and metrics look like lives behind it.

An engine turns engine-neutral parameters (``tensor_parallel``, ``max_concurrency``, ...) into an argv list
and environment, says how to tell it is ready, how to read its ``/metrics``, and what went wrong from its
exit code and log tail. Nothing outside ``optimizer/engines/`` knows a flag name.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any


class FailureKind(str, enum.Enum):
    REJECTED = "rejected"  # a pre-launch rule said no: cost no GPU time
    OOM = "oom"  # weights or KV do not fit, CUDA OOM at load/profile/capture
    BAD_ARGS = "bad_args"  # argparse / config validation refused the flags
    UNSUPPORTED = "unsupported"  # a valid flag combination the engine cannot run
    TIMEOUT = "timeout"  # never became healthy in time
    CRASH = "crash"  # died before ready, for a reason we could not name
    CRASH_UNDER_LOAD = "crash_under_load"  # was ready, died while measured
    LOAD_ERRORS = "load_errors"  # server stayed up but too many requests failed
    INTERNAL = "internal"  # servetune itself failed; never blamed on the config


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    reason: str  # one human line: what happened and, where known, what to change


@dataclass
class ModelRef:
    """The model a study serves. ``path`` is what the engine loads; ``shape`` is its config.json content."""

    name: str  # served model name (what clients put in "model")
    path: str  # directory or preset name the engine is given
    shape: dict[str, Any]  # HF config.json fields (hidden_size, num_attention_heads, ...)
    load_format: str | None = None  # e.g. "dummy" for random weights of a real shape


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    ready_timeout_s: float = 900.0


class Engine(abc.ABC):
    """One inference server implementation (vllm, sglang, sim)."""

    name: str = ""
    version: str = ""
    # rules.check topics this engine's check() already judges (more precisely): "gpus" (the GPU count),
    # "heads" (tensor_parallel against the heads), "weights" (weights, activations and KV against memory);
    # the study does not state them twice
    covers: frozenset[str] = frozenset()

    @abc.abstractmethod
    def plan(self, params: dict[str, Any], model: ModelRef, *, host: str, port: int,
             gpu_ids: list[int], extra_args: list[str] | None = None,
             extra_env: dict[str, str] | None = None, gpu: str = "h100",
             gpu_memory_gib: float | None = None) -> LaunchPlan:
        """Exact argv (never a shell string) and env for these parameters."""

    @abc.abstractmethod
    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        """Why a server that exited (or never got ready) failed."""

    def check(self, params: dict[str, Any], model: ModelRef, *, gpu: str, gpu_memory_gib: float,
              gpus_available: int) -> list[str]:
        """Engine-specific pre-launch rules: reasons this configuration would fail (empty = launch it)."""
        return []

    def span_nodes_args(self) -> list[str] | None:
        """Flags that let one server spread its pipeline stages over several Ray nodes with the engine's own
        Ray executor (it reserves the GPUs itself); None: this engine cannot span nodes under servetune."""
        return None

    def parse_metrics(self, text: str) -> dict[str, float]:
        """Prometheus text → {metric_name: value}; labelled series are summed per name."""
        from servetune.optimizer.engines.prometheus import parse_prometheus

        return parse_prometheus(text)

    def defaults(self) -> dict[str, Any]:
        """The engine's own defaults for engine-neutral parameters (the baseline trial)."""
        return {}

    # -- the audit of a measured level (loadgen.audit) ---------------------------------------------------
    kv_usage_metric: str | None = None  # the KV-cache usage gauge (0..1) sampled for a level's peak
    disturbances: tuple = ()  # engines.disturbances.Signature: log lines that disturb a measured level
    # argv flags servetune adds only to measure (more logging); an exported deployment leaves them out
    measurement_flags: tuple[str, ...] = ()

    def audit_counters(self, metrics: dict[str, float]) -> dict[str, float]:
        """One parsed /metrics scrape as loadgen.audit's cumulative engine-neutral counters
        (prompt_tokens, generation_tokens, prefix_cache_queries, prefix_cache_hits, preemptions,
        requests_finished) and the kv_cache_usage gauge; what the engine does not expose is left out."""
        return {}


class CatalogEngine(Engine):
    """An engine whose flags come from a ``search_spaces/<name>.yaml`` catalog."""

    def __init__(self, command: list[str] | None = None, version: str | None = None):
        from servetune.optimizer.catalog import load_catalog

        self.catalog = load_catalog(self.name, version)
        self.version = self.catalog.version
        self.command = list(command) if command else None

    def base_command(self) -> list[str]:
        import sys

        cmd = self.command or list(self.catalog.command)
        return [sys.executable if c == "{python}" else c for c in cmd]

    def defaults(self) -> dict[str, Any]:
        return self.catalog.defaults()

    def plan(self, params: dict[str, Any], model: ModelRef, *, host: str, port: int,
             gpu_ids: list[int], extra_args: list[str] | None = None,
             extra_env: dict[str, str] | None = None, gpu: str = "h100",
             gpu_memory_gib: float | None = None) -> LaunchPlan:
        from servetune.optimizer.catalog import render_flags

        cat = self.catalog
        argv = self.base_command()
        argv += [cat.model_flag, model.path] if cat.model_flag else [model.path]
        if cat.served_name_flag:
            argv += [cat.served_name_flag, model.name]
        argv += [cat.host_flag, host, cat.port_flag, str(port)]
        argv += self.model_flags(model)
        argv += self.gpu_flags(gpu, gpu_memory_gib)
        argv += render_flags(cat, params)
        argv += list(extra_args or [])
        env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpu_ids)}
        env.update(self.base_env())
        env.update(extra_env or {})
        return LaunchPlan(argv=argv, env=env, **self.endpoints())

    def model_flags(self, model: ModelRef) -> list[str]:
        """Flags that follow from the model rather than the search (e.g. --load-format dummy)."""
        return []

    def gpu_flags(self, gpu: str, gpu_memory_gib: float | None) -> list[str]:
        """Only the sim needs to be told which GPU it imitates; real engines see the hardware."""
        return []

    def base_env(self) -> dict[str, str]:
        return {}

    def endpoints(self) -> dict[str, Any]:
        return {}
