"""The engine contract. Everything an inference server's flags, logs, metrics and deployment look like lives
behind it.

An engine turns engine-neutral parameters (``tensor_parallel``, ``max_concurrency``, ...) into an argv list
and environment, says how to tell it is ready, how to read its ``/metrics``, what went wrong from its exit
code and log tail, which configurations it would refuse or run out of memory on, and how a chosen trial
deploys. Each adapter registers its class under its name (``engines.registry``); nothing outside
``optimizer/engines/`` knows a flag name or compares an engine's name.
"""
from __future__ import annotations

import abc
import enum
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

from servetune.optimizer.catalog import Catalog, load_catalog, parse_flags, render_flags
from servetune.optimizer.engines.disturbances import Signature
from servetune.optimizer.engines.prometheus import parse_prometheus


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
    """One inference server implementation (vllm, sglang, sim).

    The class attributes are the engine's traits: what the rest of servetune asks of an engine by name
    (``registry.engine_class(name).simulated``) without building one."""

    name: ClassVar[str] = ""  # set by registry.register
    display_name: ClassVar[str] = ""  # how a message names it ("vLLM"); the name where empty
    simulated: ClassVar[bool] = False  # servetune's own stand-in: no GPU, its numbers modelled
    # Engine start (launch -> /health 200), seconds low-high, where a study has none measured yet; the stop is
    # the shutdown and the GPU's release (optimizer.plan's wall-time estimate)
    start_s: ClassVar[tuple[float, float]] = (60.0, 155.0)
    stop_s: ClassVar[float] = 15.0
    version: str = ""

    # -- deployment (optimizer.export) ---------------------------------------------------------------------
    image: ClassVar[str | None] = None  # container image, "{version}" filled in
    pip_package: ClassVar[str | None] = None  # the pip distribution a shell deployment installs
    helm_template: ClassVar[str] = "helm-generic.yaml.j2"  # deploy_templates/ file for --format helm
    # what `servetune.optimizer.engines.version_check` appends to the launch command for the full help text
    help_args: ClassVar[tuple[str, ...]] = ("--help",)
    metrics_prefix: ClassVar[str | None] = None  # its /metrics names start so (tells a server bench met)

    def __init__(self, command: list[str] | None = None, version: str | None = None) -> None:
        self.command = list(command) if command else None
        self.version = version or self.version

    @classmethod
    def label(cls) -> str:
        return cls.display_name or cls.name

    def base_command(self) -> list[str]:
        """The command that starts the engine, before its flags."""
        return list(self.command or [])

    @abc.abstractmethod
    def plan(self, params: dict[str, Any], model: ModelRef, *, host: str, port: int,
             gpu_ids: list[int], extra_args: list[str] | None = None,
             extra_env: dict[str, str] | None = None, gpu: str = "h100",
             gpu_memory_gib: float | None = None) -> LaunchPlan:
        """Exact argv (never a shell string) and env for these parameters."""

    @abc.abstractmethod
    def classify(self, log_tail: str, exit_code: int | None) -> Failure:
        """Why a server that exited (or never got ready) failed."""

    # -- pre-launch rules (optimizer.rules runs the engine-neutral ones, then these) -------------------------
    def check(self, params: dict[str, Any], model: ModelRef, *, gpu: str, gpu_memory_gib: float,
              gpus_available: int) -> list[str]:
        """Engine-specific rules: reasons this configuration would be refused (empty = launch it)."""
        return []

    def check_memory(self, params: dict[str, Any], model: ModelRef, *, gpu: str,
                     gpu_memory_gib: float) -> list[str]:
        """Reasons the configuration would surely run out of memory. Judged only for a configuration every
        other rule accepts: the estimate assumes one the engine would run."""
        return []

    def span_nodes_args(self) -> list[str] | None:
        """Flags that let one server spread its pipeline stages over several Ray nodes with the engine's own
        Ray executor (it reserves the GPUs itself); None: this engine cannot span nodes under servetune."""
        return None

    def parse_metrics(self, text: str) -> dict[str, float]:
        """Prometheus text → {metric_name: value}; labelled series are summed per name."""
        return parse_prometheus(text)

    def metrics_delta(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Two parsed scrapes → what moved between them (engines map their names to engine-neutral keys)."""
        return {k: round(after[k] - before.get(k, 0.0), 6) for k in after}

    def defaults(self) -> dict[str, Any]:
        """The engine's own defaults for engine-neutral parameters (the baseline trial)."""
        return {}

    # -- deployment ------------------------------------------------------------------------------------------
    def pip_spec(self, version: str) -> str:
        return f"{self.pip_package or self.name}=={version}"

    def ray_serve_engine_kwargs(self, args: list[str]) -> tuple[dict[str, Any], list[str]] | None:
        """The launch flags (model first) as Ray Serve LLM's ``engine_kwargs``, with warnings; None: Ray Serve
        LLM cannot run this engine."""
        return None

    # -- the audit of a measured level (loadgen.audit) ---------------------------------------------------
    kv_usage_metric: ClassVar[str | None] = None  # the KV-cache usage gauge (0..1) sampled for a level's peak
    disturbances: ClassVar[tuple[Signature, ...]] = ()  # log lines that disturb a measured level
    # argv flags servetune adds only to measure (more logging); an exported deployment leaves them out
    measurement_flags: ClassVar[tuple[str, ...]] = ()

    def audit_counters(self, metrics: dict[str, float]) -> dict[str, float]:
        """One parsed /metrics scrape as loadgen.audit's cumulative engine-neutral counters
        (prompt_tokens, generation_tokens, prefix_cache_queries, prefix_cache_hits, preemptions,
        requests_finished) and the kv_cache_usage gauge; what the engine does not expose is left out."""
        return {}


class CatalogEngine(Engine):
    """An engine whose flags come from a ``search_spaces/<name>.yaml`` catalog."""

    def __init__(self, command: list[str] | None = None, version: str | None = None):
        self.catalog: Catalog = load_catalog(self.name, version)
        self.version = self.catalog.version
        self.command = list(command) if command else None

    def base_command(self) -> list[str]:
        cmd = self.command or list(self.catalog.command)
        return [sys.executable if c == "{python}" else c for c in cmd]

    def defaults(self) -> dict[str, Any]:
        return self.catalog.defaults()

    def launch_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters as the catalog renders them for this engine (an engine spells some out)."""
        return params

    def neutral_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`launch_params` where the catalog's reverse mapping cannot tell."""
        return params

    def parse_flags(self, args: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Launch flags back to (engine-neutral parameters, the flags no mapping claims)."""
        params, rest = parse_flags(self.catalog, args)
        return self.neutral_params(params), rest

    def plan(self, params: dict[str, Any], model: ModelRef, *, host: str, port: int,
             gpu_ids: list[int], extra_args: list[str] | None = None,
             extra_env: dict[str, str] | None = None, gpu: str = "h100",
             gpu_memory_gib: float | None = None) -> LaunchPlan:
        cat = self.catalog
        argv = self.base_command()
        argv += [cat.model_flag, model.path] if cat.model_flag else [model.path]
        if cat.served_name_flag:
            argv += [cat.served_name_flag, model.name]
        argv += [cat.host_flag, host, cat.port_flag, str(port)]
        argv += self.model_flags(model)
        argv += self.gpu_flags(gpu, gpu_memory_gib)
        argv += render_flags(cat, self.launch_params(params))
        argv += list(extra_args or [])
        env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpu_ids)}
        env.update({k: v for k, v in self.base_env().items() if k not in os.environ})  # what the host sets wins
        env.update(extra_env or {})
        return LaunchPlan(argv=argv, env=env, **self.endpoints())

    def model_flags(self, model: ModelRef) -> list[str]:
        """Flags that follow from the model rather than the search (e.g. --load-format dummy)."""
        return []

    def gpu_flags(self, gpu: str, gpu_memory_gib: float | None) -> list[str]:
        """Only the sim needs to be told which GPU it imitates; real engines see the hardware."""
        return []

    def base_env(self) -> dict[str, str]:
        """Environment the engine is launched with; :meth:`plan` leaves out what the host already sets."""
        return {}

    def endpoints(self) -> dict[str, Any]:
        return {}
