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

    @abc.abstractmethod
    def plan(self, params: dict[str, Any], model: ModelRef, *, host: str, port: int,
             gpu_ids: list[int], extra_args: list[str] | None = None,
             extra_env: dict[str, str] | None = None) -> LaunchPlan:
        """Exact argv (never a shell string) and env for these parameters."""

    @abc.abstractmethod
    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        """Why a server that exited (or never got ready) failed."""

    def parse_metrics(self, text: str) -> dict[str, float]:
        """Prometheus text → {metric_name: value}; labelled series are summed per name."""
        from servetune.optimizer.engines.prometheus import parse_prometheus

        return parse_prometheus(text)

    def defaults(self) -> dict[str, Any]:
        """The engine's own defaults for engine-neutral parameters (the baseline trial)."""
        return {}
