"""The study file: a pydantic model of study.yaml, loaded with errors that point at the YAML line.

Every command that reads a study goes through :func:`load_study`. A bad file raises :class:`SpecError`,
whose lines read ``FILE:LINE: path.to.key: message``; the CLI prints them and exits 2, never a traceback.

Checks that need the file system (``model.path``, ``workload.dataset.path``) run only when a study is
loaded from text (:func:`parse_study` / :func:`load_study`): relative paths are resolved from the study
file's directory then. ``StudySpec.model_validate`` on plain data (a worker re-reading a plan) skips them.
"""
from __future__ import annotations

import datetime
import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from servetune.optimizer import safe_read, study_yaml
from servetune.optimizer.engines.registry import names as engine_names
from servetune.optimizer.secret_refs import is_literal_secret, literal_flag_secrets, ref_name

ENGINES = engine_names()
SCENARIOS = ("offline", "server", "interactive", "single_stream", "concurrency")

# MLPerf LLM latency limits (p99 TTFT ms, p99 TPOT ms); loadgen-and-mlperf.md §1.5.
from servetune.loadgen.sla import SLA_PRESETS, sla_limits  # noqa: E402  (the table lives with the load generator)

# Objective metrics a scenario summary carries, with the direction that makes a config better.
_LATENCIES = ("ttft", "tpot", "itl", "e2e")
_STATS = ("p50", "p90", "p99", "mean")
METRICS: dict[str, str] = {
    "output_tokens_per_s": "maximize",
    "output_tokens_per_s_per_gpu": "maximize",
    "request_per_s": "maximize",
    "tokens_per_s_per_user": "maximize",
    "goodput_request_per_s": "maximize",
    **{f"{lat}_{st}_ms": "minimize" for lat in _LATENCIES for st in _STATS},
    "error_rate": "minimize",
    "usd_per_million_tokens": "minimize",
}

# Parameters whose values have a floor (GPU counts, token counts, sizes) or a ceiling.
_PARAM_MIN: dict[str, float] = {
    "tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 1, "max_concurrency": 1,
    "max_batched_tokens": 1, "kv_block_size": 1, "max_model_len": 1, "speculative_tokens": 1,
    "speculative_lookup_max": 1, "speculative_lookup_min": 1, "cuda_graph_max_batch": 1, "stream_interval": 1,
}
_GPU_PARAMS = ("tensor_parallel", "pipeline_parallel", "data_parallel")
_OFF = (None, "none", False, "off", 0)  # a `requires:` parent with one of these is off (as in space.py)
_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")

# Sane ranges for the numbers a study gives: a value outside one would fail a launch, never end or exhaust
# memory (`qps: .inf`, `num_requests: 1000000000000`). Every number is also finite and of its own type
# (`trials: true` is not 1).
MAX_QPS = 100_000  # requests per second, far beyond one server
MAX_CONCURRENCY = 100_000
MAX_TOKENS = 1_048_576  # tokens per prompt or output (a 1M-token context)
MAX_REQUESTS = 1_000_000
MAX_SECONDS = 86_400  # one day for a scenario, a level, a server start
MAX_WALL_S = 30 * 86_400
MAX_GPUS = 1024
MAX_SEED = 2**32 - 1  # Optuna's and numpy's seeds are 32-bit
MAX_PARAM_INT = 2**31 - 1  # engines read integer flags as 32-bit
MAX_NAME = 100  # the study name names a directory and the Optuna study
MAX_TRIALS = 100_000
Rate = Annotated[float, Field(gt=0, le=MAX_QPS)]
Level = Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]


def _parameters() -> dict[str, Any]:
    """Engine-neutral parameter names (search_spaces/parameters.yaml) with type and ``requires``."""
    try:
        from servetune.optimizer.space import PARAMETERS
    except ImportError:  # the search-space module is optional for validation; read the table directly
        text = (Path(__file__).resolve().parent.parent / "search_spaces" / "parameters.yaml").read_text()
        PARAMETERS = yaml.safe_load(text)
    return PARAMETERS


def _pget(p: Any, key: str) -> Any:
    return p.get(key) if isinstance(p, dict) else getattr(p, key, None)


def _fail(title: str, errors: list[tuple[tuple, str]]) -> None:
    """Raise a ValidationError whose errors sit at ``loc`` (relative to the model being validated)."""
    raise ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("spec", "{msg}", {"msg": msg}), loc=tuple(loc), input=None)
        for loc, msg in errors
    ])


def _close(word: Any, choices: Any) -> str | None:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(word: Any, choices: Any) -> str:
    close = _close(word, choices)
    return f" (did you mean {close!r}?)" if close else ""


def _did_you_mean_or_list(word: Any, choices: Any) -> str:
    return _did_you_mean(word, choices) or f" (known: {', '.join(str(c) for c in choices)})"


def _describe(v: Any) -> str:
    if v is None:
        return "nothing (an empty value)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if v != v else (".inf" if v > 0 else "-.inf")  # as YAML spells them
    if isinstance(v, (datetime.date, datetime.datetime)):
        return f"a date ({v.isoformat()}; quote it if you mean the text)"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _resolve(base_dir: str, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else Path(base_dir) / q


def _base_dir(info: ValidationInfo) -> str | None:
    ctx = info.context if info is not None else None
    return ctx.get("base_dir") if isinstance(ctx, dict) else None


class _Strict(BaseModel):
    # strict: a number is a number (not true, not the text '5'); allow_inf_nan: .nan and .inf are no numbers
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    preset: str | None = Field(None, description="built-in shape: llama-3.2-1b, llama-3.1-8b, llama-3.1-70b, mixtral-8x7b")
    path: str | None = Field(None, description="checkpoint directory with config.json (what a real engine loads)")
    name: str | None = Field(None, description="served model name; defaults to the preset or directory name")
    load_format: str | None = Field(None, description="e.g. 'dummy' for random weights of the real shape")

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> "ModelSpec":
        if not self.preset and not self.path:
            raise ValueError("give model.preset (a built-in shape) or model.path (a checkpoint directory)")
        base = _base_dir(info)
        if self.path and base is not None:
            p = _resolve(base, self.path)
            where = "" if os.path.isabs(os.path.expanduser(self.path)) else f" (looked in {p})"
            if not p.exists():
                hint = ""
                if re.fullmatch(r"[\w.-]+/[\w.-]+", self.path):
                    hint = ("; if it is a Hugging Face id, download it first (huggingface-cli download "
                            f"{self.path} --local-dir DIR) and give path: DIR")
                _fail("model", [(("path",), f"no such directory {self.path!r}{where}{hint}")])
            if not p.is_dir():
                _fail("model", [(("path",), f"{self.path!r} is a file; model.path is the checkpoint directory "
                                            "(the one holding config.json)")])
            if not (p / "config.json").is_file():
                _fail("model", [(("path",), f"{self.path!r} has no config.json{where}; point model.path at the "
                                            "checkpoint directory (the one holding config.json)")])
            from servetune.optimizer.perfmodel.model_shapes import config_problem, load_shape

            try:  # the shape the pre-launch rules and the sim compute with: a hostile config.json fails here
                why = config_problem(load_shape(path=str(p)))
            except ValueError as e:
                why = str(e).replace(str(p / "config.json"), "config.json")
            if why:
                _fail("model", [(("path",), f"{self.path!r}: {why}")])
        return self


class HardwareSpec(_Strict):
    gpu: str = Field("h100", description="GPU kind: h100, h200, a100, l40s, ... (sim timing and memory rules)")
    gpus: int = Field(1, ge=1, le=MAX_GPUS, description="GPUs the study may use on this host or cluster")
    max_gpus_per_trial: int | None = Field(None, ge=1, le=MAX_GPUS)
    gpu_memory_gib: float | None = Field(None, gt=0, le=1024, description="override the GPU table's memory")

    @model_validator(mode="after")
    def _per_trial(self) -> "HardwareSpec":
        if self.max_gpus_per_trial is not None and self.max_gpus_per_trial > self.gpus:
            _fail("hardware", [(("max_gpus_per_trial",),
                                f"max_gpus_per_trial ({self.max_gpus_per_trial}) exceeds gpus ({self.gpus})")])
        return self

    @property
    def per_trial(self) -> int:
        return self.max_gpus_per_trial or self.gpus


class NodeTypeSpec(_Strict):
    gpu: str = Field(description="GPU kind of these nodes: h100, a100, ... (sim timing and memory rules)")
    gpus_per_node: int = Field(ge=1, le=64, description="GPUs one such node has")
    gpu_memory_gib: float | None = Field(None, gt=0, description="override the GPU table's memory")
    accelerator_type: str | None = Field(None, description="the Ray resource that marks these nodes, "
                                         "accelerator_type:<this>; default the GPU kind in capitals (H100)")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        from servetune.optimizer.perfmodel.hardware import get_gpu

        return get_gpu(v).name

    @property
    def ray_resource(self) -> str:
        return f"accelerator_type:{self.accelerator_type or self.gpu.upper()}"


class ClusterSpec(_Strict):
    """A study spread over a Ray cluster (docs/cluster.md)."""

    address: str | None = Field(None, description="Ray address to join (auto, host:port, ray://...); "
                                "--ray-address overrides it")
    files: Literal["object_store", "shared_dir"] = Field(
        "object_store", description="how a trial's files reach output_dir: object_store (returned through "
        "Ray with the result) or shared_dir (output_dir is one file system every node mounts at the same path)")
    span_nodes: bool = Field(False, description="a trial may need more GPUs than one node has: pipeline "
                             "parallel across nodes through the engine's own Ray executor")
    node_types: list[NodeTypeSpec] = Field(default_factory=list, description="GPU types of a heterogeneous "
                                           "cluster; with several, the GPU type is searched like a parameter")

    @field_validator("node_types")
    @classmethod
    def _types_once(cls, v: list[NodeTypeSpec]) -> list[NodeTypeSpec]:
        seen: dict[str, int] = {}
        errs = []
        for i, t in enumerate(v):
            if t.ray_resource in seen:
                errs.append(((i,), f"{t.ray_resource} is named twice (first at node_types[{seen[t.ray_resource]}]); "
                                   "give each type its own accelerator_type"))
            seen.setdefault(t.ray_resource, i)
        if errs:
            _fail("node_types", errs)
        return v


class EngineSpec(_Strict):
    name: Literal[ENGINES]  # type: ignore[valid-type]
    command: list[str] | None = Field(None, description="how to start it, e.g. ['vllm', 'serve'] or a python path")
    version: str | None = Field(None, description="engine version whose flag mapping to use")
    extra_args: list[str] = Field(default_factory=list, description="flags passed after the mapped ones; a secret "
                                  "as ${NAME} (read from the environment at launch, never recorded)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment; use ${NAME} to pass a secret by name")
    ready_timeout_s: float = Field(900.0, gt=0, le=MAX_SECONDS)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        # `version: 0.26` is read by YAML as a float; a version is text
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out: dict[Any, Any] = {}
        errs: list[tuple[tuple, str]] = []
        for k, val in v.items():
            if isinstance(val, bool):
                errs.append(((k,), f"{_describe(val)} is not text; quote the value: {k}: \"{'1' if val else '0'}\" "
                                   f"(or \"{'true' if val else 'false'}\")"))
                continue
            if isinstance(val, (int, float)):
                val = str(val)  # VAR: 1 means "1"
            out[k] = val
            if isinstance(k, str) and isinstance(val, str) and is_literal_secret(k, val):
                errs.append(((k,), f"{k} looks like a secret written into the study file; write "
                                   f"{k}: \"${{{k}}}\" and export {k} in the shell that runs servetune "
                                   "(the value is read from there at launch and never stored)"))
        if errs:
            _fail("env", errs)
        return out

    @field_validator("extra_args")
    @classmethod
    def _no_literal_secret_flags(cls, v: list[str]) -> list[str]:
        # both spellings: `--api-key sk-...` and `--api-key=sk-...`
        errs = []
        for k, flag in literal_flag_secrets(v):
            name = ref_name(flag)
            errs.append(((k,), f"{flag} is given a secret written into the study file; write {flag} "
                               f"\"${{{name}}}\" and export {name} in the shell that runs servetune (the value "
                               "is read from there at launch and never stored)"))
        if errs:
            _fail("extra_args", errs)
        return v


Domain = Union[list[Any], dict[str, Any], int, float, str, bool, None]


class RangeDomain(_Strict):
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> "RangeDomain":
        if self.low > self.high:
            _fail("range", [((), f"low ({_num(self.low)}) is above high ({_num(self.high)})")])
        if self.log and self.low <= 0:
            _fail("range", [(("low",), f"a log domain needs low > 0 (got {_num(self.low)})")])
        if self.log and self.step is not None:
            _fail("range", [(("step",), "step and log: true cannot be combined; drop one")])
        return self


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


class DatasetSpec(_Strict):
    kind: Literal["random", "sharegpt", "token_ids", "text_tasks"] = "random"
    input_tokens: int = Field(512, ge=1, le=MAX_TOKENS)
    output_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="random: tokens asked per request; text_tasks: "
                               "the most a request asks for (copy tasks ask for about their source's length)")
    input_range: float = Field(0.0, ge=0, lt=1, description="±fraction around input_tokens (0 = fixed)")
    output_range: float = Field(0.0, ge=0, lt=1)
    num_requests: int = Field(200, ge=1, le=MAX_REQUESTS)
    path: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)
    ignore_eos: bool = True
    prompt_format: Literal["auto", "text", "token_ids"] = Field(
        "auto", description="random prompts as text (the server tokenizes them inside TTFT, as for real clients) "
        "or as token ids (MLPerf's harness); auto: text when a tokenizer is found (tokenizer, else model.path), "
        "else token ids")
    tokenizer: str | None = Field(
        None, description="model directory or tokenizer.json for exact-length prompts; default model.path")
    shared_prefix_tokens: int = Field(
        0, ge=0, description="random: every prompt starts with the same this many tokens, a declared prefix-cache "
        "workload (its cache hits are expected, not a flaw of the measurement)")
    replay: bool = Field(
        False, description="a sample issued again (more requests than num_requests) resends its prompt, a "
        "declared prefix-cache workload; default false: every request is unique")
    tasks: list[Literal["rewrite", "summarize", "code_edit", "freeform"]] | None = Field(
        None, description="text_tasks: which tasks (default rewrite, summarize, code_edit: answers that reuse "
                          "their input; freeform: new writing on a topic)")
    temperature: float | None = Field(None, ge=0, le=100, description="sampling temperature sent with every request "
                                                              "(0 = greedy); default: the server's")

    @model_validator(mode="after")
    def _path(self, info: ValidationInfo) -> "DatasetSpec":
        if self.tasks is not None and self.kind != "text_tasks":
            _fail("dataset", [(("tasks",), f"tasks apply to kind: text_tasks, not {self.kind}")])
        if self.tasks is not None and not self.tasks:
            _fail("dataset", [(("tasks",), "an empty list of tasks")])
        if self.kind != "random" and (self.shared_prefix_tokens or self.prompt_format != "auto"):
            key = "shared_prefix_tokens" if self.shared_prefix_tokens else "prompt_format"
            _fail("dataset", [((key,), f"{key} shapes random prompts; {_a(self.kind)} dataset sends "
                                       + ("the text servetune ships" if self.kind == "text_tasks" else
                                          "the file's prompts") + " as they are")])
        if self.shared_prefix_tokens >= self.input_tokens * (1 - self.input_range):
            _fail("dataset", [(("shared_prefix_tokens",), f"shared_prefix_tokens ({self.shared_prefix_tokens}) "
                                                          "must be below the shortest prompt's input_tokens")])
        if self.kind == "text_tasks":
            if self.path:
                _fail("dataset", [(("path",), "a text_tasks dataset uses the text servetune ships; it has no path")])
            return self
        if self.kind != "random" and not self.path:
            _fail("dataset", [(("path",), f"{_a(self.kind)} dataset needs path (the file to read prompts from)")])
        if self.kind == "random" and self.path:
            _fail("dataset", [(("path",), "a random dataset ignores path; set kind: sharegpt or token_ids "
                                          "to read prompts from the file")])
        base = _base_dir(info)
        if self.path and base is not None:
            p = _resolve(base, self.path)
            where = "" if os.path.isabs(os.path.expanduser(self.path)) else f" (looked in {p})"
            problem = None
            if not p.exists():
                problem = f"no such file {self.path!r}{where}"
            elif p.is_dir():
                problem = f"{self.path!r} is a directory; give the dataset file"
            elif safe_read.regular_file_problem(p):  # a FIFO would block the read below; a device never ends
                problem = f"{self.path!r} {safe_read.regular_file_problem(p)}; give the dataset file"
            else:
                try:
                    with open(p, "rb") as f:
                        if not f.read(1):
                            problem = f"{self.path!r} is empty"
                except OSError as e:
                    problem = f"cannot read {self.path!r}: {e.strerror or e}"
            if problem:
                _fail("dataset", [(("path",), problem)])
        if self.tokenizer and base is not None:
            from servetune.loadgen.tokenizer import find_tokenizer

            if find_tokenizer(_resolve(base, self.tokenizer)) is None:
                _fail("dataset", [(("tokenizer",), f"no tokenizer.json at {self.tokenizer!r}; give the model "
                                                   "directory that holds it, or the file")])
        return self


class SLASpec(_Strict):
    preset: str | None = Field(None, description="MLPerf limits: " + ", ".join(SLA_PRESETS))
    ttft_p99_ms: float | None = Field(None, gt=0, le=MAX_SECONDS * 1000)
    tpot_p99_ms: float | None = Field(None, gt=0, le=MAX_SECONDS * 1000)

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in SLA_PRESETS:
            raise ValueError(f"unknown SLA preset {v!r}{_did_you_mean_or_list(v, SLA_PRESETS)}")
        return v

    @model_validator(mode="after")
    def _some(self) -> "SLASpec":
        if self.preset is None and self.ttft_p99_ms is None and self.tpot_p99_ms is None:
            raise ValueError("an empty sla; give preset (e.g. llama3.1-8b) and/or ttft_p99_ms, tpot_p99_ms")
        return self

    def limits(self, scenario: str | None = None) -> tuple[float | None, float | None]:
        """(p99 TTFT ms, p99 TPOT ms) for a scenario of kind ``scenario``: the preset as it applies there
        (loadgen.sla's one resolution, so run and bench agree), overridden by explicit limits."""
        ttft, tpot = sla_limits(self.preset, scenario) if self.preset else (None, None)
        return (self.ttft_p99_ms or ttft, self.tpot_p99_ms or tpot)


class MaxQPSSpec(_Strict):
    """The highest arrival rate that meets the SLA, searched within one launch (loadgen.search.find_max_qps)."""

    lo: float = Field(gt=0, le=MAX_QPS, description="a rate the configuration should sustain (measured first)")
    hi: float = Field(gt=0, le=MAX_QPS, description="a rate above its capacity (measured second)")
    tolerance: float = Field(0.05, gt=0, lt=1, description="stop once the bracket is this narrow (relative)")
    max_levels: int = Field(8, ge=2, le=100, description="at most this many rates measured, lo and hi included")
    max_level_duration_s: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="a level too short to judge (its median request longer than half "
        "the level) runs once more, for 2.2× that median, when that fits in this; default 3× the scenario's duration_s")
    per_gpu: bool = Field(
        False, description="lo and hi are rates per GPU: a trial on G GPUs searches lo·G..hi·G (a sharding search "
        "then starts each trial near its own capacity instead of overloading one GPU with an 8-GPU bracket)")
    floor: float | None = Field(
        None, gt=0, description="when lo is not valid, the rate is halved down to this before the trial is called "
        "'SLA missed' (so every configuration that serves at all gets a capacity); default lo/16, four halvings "
        "at most, each one more level; floor: lo turns the halving off")

    @model_validator(mode="after")
    def _order(self) -> "MaxQPSSpec":
        if self.hi <= self.lo:
            _fail("max_qps", [(("hi",), f"hi ({_num(self.hi)}) must be above lo ({_num(self.lo)})")])
        if self.floor is not None and self.floor > self.lo:
            _fail("max_qps", [(("floor",), f"floor ({_num(self.floor)}) must be at most lo ({_num(self.lo)}): it is "
                                           "the lowest rate tried when lo is not valid")])
        return self


def rate_bracket(max_qps: dict[str, Any], gpus: int) -> tuple[float, float]:
    """The (lo, hi) a trial on ``gpus`` GPUs searches, from a dumped :class:`MaxQPSSpec`."""
    scale = gpus if max_qps.get("per_gpu") else 1
    return max_qps["lo"] * scale, max_qps["hi"] * scale


def rate_floor(max_qps: dict[str, Any], gpus: int) -> float | None:
    """The lowest rate a trial on ``gpus`` GPUs tries when lo is not valid (None: the search's default)."""
    floor = max_qps.get("floor")
    return None if floor is None else floor * (gpus if max_qps.get("per_gpu") else 1)


class ScenarioSpec(_Strict):
    kind: Literal["offline", "server", "interactive", "single_stream", "concurrency"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64,
                             description="defaults to kind; objectives refer to it")
    qps: Rate | list[Rate] | None = Field(
        None, description="server/interactive: Poisson arrival rate; a list is a load sweep within one launch "
                          "(ascending; it stops at the first rate that misses the SLA)")
    concurrency: Level | list[Level] | None = Field(
        None, description="concurrency scenario: requests kept outstanding (closed loop); a list is a sweep within "
                          "one launch (ascending; output tokens/s/GPU against tokens/s/user at each level; it "
                          "stops at the first level that misses the SLA)")
    max_qps: MaxQPSSpec | None = Field(
        None, description="server/interactive, instead of qps: search the highest rate that meets the SLA "
                          "within one launch (bracket lo..hi, then narrow it to tolerance)")
    duration_s: float | None = Field(None, gt=0, le=MAX_SECONDS, description="minimum scheduled duration")
    num_requests: int | None = Field(None, ge=1, le=MAX_REQUESTS, description="defaults to the dataset size")
    max_connections: int | None = Field(None, ge=1, le=MAX_CONCURRENCY,
                                        description="client-side cap on outstanding requests (reported)")
    warmup_requests: int = Field(0, ge=0, le=MAX_REQUESTS)
    timeout_s: float = Field(600.0, gt=0, le=MAX_SECONDS, description="the whole scenario never runs past this")
    sla: SLASpec | None = None
    dataset: DatasetSpec | None = Field(
        None, description="this scenario's prompts, instead of workload.dataset (e.g. a copy-heavy and a "
                          "free-writing workload measured on the same launch)")
    min_keep_up: float | None = Field(
        0.7, ge=0, le=1, description="server/interactive: departures ÷ arrivals over the second half of the "
        "schedule below this (beyond Poisson noise) make a run invalid, and so does a run shorter than twice "
        "its median request lifetime; null turns both checks off (see loadgen/validity.py)")

    @model_validator(mode="after")
    def _rate(self) -> "ScenarioSpec":
        if self.max_qps is not None:
            if self.kind not in ("server", "interactive"):
                _fail("scenario", [(("max_qps",), f"max_qps searches an arrival rate: it applies to server and "
                                                  f"interactive scenarios, not {_a(self.kind)} one")])
            if self.qps is not None:
                _fail("scenario", [(("qps",), "give qps (fixed rates) or max_qps (a search for the highest "
                                              "valid rate), not both")])
            if self.sla is None:
                _fail("scenario", [(("max_qps",), "max_qps needs an sla: the search is for the highest rate "
                                                  "that meets it")])
        elif self.kind in ("server", "interactive") and self.qps is None:
            _fail("scenario", [(("qps",), f"{_a(self.kind)} scenario needs qps (requests per second), or "
                                          f"max_qps to search the highest rate that meets the SLA")])
        rates = self.qps if isinstance(self.qps, list) else ([] if self.qps is None else [self.qps])
        if isinstance(self.qps, list) and not self.qps:
            _fail("scenario", [(("qps",), "an empty list of rates")])
        for i, r in enumerate(rates):
            if r <= 0:
                _fail("scenario", [(("qps",), f"rates must be above 0 (got {r:g})")])
        if rates != sorted(rates) or len(set(rates)) != len(rates):
            _fail("scenario", [(("qps",), "list the sweep's rates in ascending order, each once")])
        if self.kind == "concurrency":
            levels = self.concurrency if isinstance(self.concurrency, list) else (
                [] if self.concurrency is None else [self.concurrency])
            if not levels:
                _fail("scenario", [(("concurrency",), "a concurrency scenario needs concurrency (requests kept "
                                                      "outstanding), one number or an ascending list")])
            if any(c < 1 for c in levels):
                _fail("scenario", [(("concurrency",), "concurrency levels must be at least 1")])
            if levels != sorted(levels) or len(set(levels)) != len(levels):
                _fail("scenario", [(("concurrency",), "list the sweep's levels in ascending order, each once")])
            if self.qps is not None:
                _fail("scenario", [(("qps",), "a concurrency scenario sends the next request when one finishes; "
                                              "qps has no meaning there")])
        elif self.concurrency is not None:
            _fail("scenario", [(("concurrency",), f"concurrency applies to kind: concurrency, not {self.kind} "
                                                  "(max_connections caps the others)")])
        if self.kind in ("offline", "single_stream") and self.qps is not None:
            _fail("scenario", [(("qps",), f"qps has no meaning for {_a(self.kind)} scenario "
                                          "(it sends as fast as it can); use kind: server for a fixed rate")])
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class WarmupSpec(_Strict):
    """Warm-up before a launch's first measured level (optimizer/warmup.py)."""

    enabled: bool = Field(True, description="warm the engine across the batch sizes the levels will reach "
                          "before measuring, in rounds until one shows no new kernel compilation")
    max_s: float = Field(300.0, gt=0, description="no warm-up round starts once this many seconds are spent "
                         "(also the bound of the warm-up before an audit re-run)")
    max_concurrency: int | None = Field(
        None, ge=1, description="top of the concurrency ramp; default: the engine's batch limit "
        "(max_concurrency) or the most requests a level keeps in flight, whichever is smaller")


class AuditSpec(_Strict):
    """The engine-side audit of every measured level (loadgen/audit.py)."""

    enabled: bool = Field(True, description="compare each level with the engine's /metrics and log: token "
                          "counts, prefix-cache hits, compilation during the level")
    max_prefix_cache_hit_fraction: float | None = Field(
        0.01, ge=0, le=1, description="prefix-cache hits above this fraction of the prompt tokens make a level "
        "invalid; null for a workload that shares prefixes on purpose (hits are then what it measures)")
    rerun: bool = Field(True, description="run a level whose audit fails once more after more warm-up (the "
                        "re-run replaces it; one that fails again is reported as contaminated)")


class WorkloadSpec(_Strict):
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    scenarios: list[ScenarioSpec] = Field(min_length=1)
    warmup: WarmupSpec = Field(default_factory=WarmupSpec, description="warm-up before a launch's first measured "
                               "level: rounds of a concurrency ramp until one compiles nothing (issue 15)")
    audit: AuditSpec = Field(default_factory=AuditSpec, description="every measured level checked against the "
                             "engine's own /metrics and log: token counts, prefix-cache hits, compilation")

    def audit_settings(self) -> dict[str, Any]:
        """The audit as trials apply it: a dataset that declares prompt reuse (a shared prefix, or replay)
        expects prefix-cache hits, so the hit rule is off there; everywhere else a hit is a flaw."""
        audit = self.audit.model_dump()
        if self.dataset.shared_prefix_tokens or self.dataset.replay:
            audit["max_prefix_cache_hit_fraction"] = None
        return audit

    @model_validator(mode="before")
    @classmethod
    def _none_dataset(cls, v: Any) -> Any:
        if isinstance(v, dict) and "dataset" in v and v["dataset"] is None:
            v = {k: x for k, x in v.items() if k != "dataset"}
        return v

    @model_validator(mode="after")
    def _unique(self) -> "WorkloadSpec":
        errs: list[tuple[tuple, str]] = []
        first: dict[str, int] = {}
        for j, s in enumerate(self.scenarios):
            if s.label in first:
                where = "name" if s.name else "kind"
                errs.append((("scenarios", j, where), f"two scenarios are named {s.label!r} (the first is "
                                                      f"scenarios[{first[s.label]}]); give one a different name:"))
            else:
                first[s.label] = j
        # An interactive scenario is the server scenario with tighter latency limits (MLPerf); looser ones
        # almost always mean the presets were swapped.
        servers = [(s, s.sla.limits(s.kind)) for s in self.scenarios if s.kind == "server" and s.sla]
        for j, s in enumerate(self.scenarios):
            if s.kind != "interactive" or not s.sla:
                continue
            ttft, tpot = s.sla.limits(s.kind)
            for srv, (sttft, stpot) in servers:
                looser = [f"{n} {_num(a)} ms > {_num(b)} ms" for n, a, b in
                          (("ttft_p99", ttft, sttft), ("tpot_p99", tpot, stpot))
                          if a is not None and b is not None and a > b]
                if looser:
                    errs.append((("scenarios", j, "sla"),
                                 f"interactive limits are looser than those of server scenario {srv.label!r} "
                                 f"({', '.join(looser)}); an interactive scenario is the stricter one "
                                 "(e.g. preset llama3.1-8b-interactive) - were the SLAs swapped?"))
                    break
        if errs:
            _fail("workload", errs)
        return self


class ObjectiveSpec(_Strict):
    metric: str
    scenario: str | None = Field(None, description="scenario name; defaults to the first scenario")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="defaults to the metric's natural direction (throughput up, latency/errors/cost down)")

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}{_did_you_mean(v, METRICS)}; metrics are "
                             "output_tokens_per_s, output_tokens_per_s_per_gpu, request_per_s, "
                             "tokens_per_s_per_user, goodput_request_per_s, {ttft,tpot,itl,e2e}_{p50,p90,p99,mean}_ms, "
                             "error_rate, usd_per_million_tokens")
        return v

    @field_validator("direction")
    @classmethod
    def _dir(cls, v: str | None, info: ValidationInfo) -> str:
        metric = info.data.get("metric")
        natural = METRICS.get(metric) if metric else None
        if v is None:
            return natural or "maximize"
        if natural and v != natural:
            better = "higher" if natural == "maximize" else "lower"
            raise ValueError(f"to {v} {metric} would prefer the worst configs ({better} is better); "
                             f"use direction: {natural} or leave direction out")
        return v


class SamplerSpec(_Strict):
    kind: Literal["tpe", "nsga2", "random", "gp", "grid"] = "tpe"
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    startup_trials: int | None = Field(None, ge=0, le=MAX_TRIALS)
    learn_from_failures: bool = Field(
        True, description="tell failed and rejected trials to the sampler as infeasible (constraint-violating) "
                          "results with pessimistic values, so it samples fewer of their neighbours; they "
                          "never appear on the Pareto front")


class FidelitySpec(_Strict):
    prescreen: int = Field(0, ge=0, le=1000, description="candidates the sampler proposes per launch; each is "
                                                         "scored by the sim estimator and only the most promising "
                                                         "is launched (0 or 1: off)")
    calibrate: bool = Field(True, description="scale the estimator by factors fitted on this study's measured "
                                              "trials (least squares of log(measured/estimated))")
    max_requests: int = Field(200, ge=10, le=MAX_REQUESTS,
                              description="requests per estimated scenario (cost vs fidelity)")


class QualitySpec(_Strict):
    """The quality guardrail (docs/quality.md): after its load, every trial answers an evaluation set greedily
    with logprobs, compared with its engine's baseline; limits make a trial that drifts too far infeasible."""

    eval_set: str = Field("builtin", description="'builtin' (64 prompts shipped with servetune) or a JSONL "
                                                 "file of {prompt, id?, max_tokens?} lines")
    tasks: str | None = Field(None, description="JSONL of {prompt, answer} (lm-evaluation-harness style) scored "
                                                "after normalization; 'builtin:facts' is a small shipped set")
    task_match: Literal["contains", "exact"] = Field(
        "contains", description="a task is right when its output contains an answer (whole words), or when "
                                "its first line is one (exact)")
    max_tokens: int = Field(32, ge=1, le=4096, description="greedy tokens per prompt (an item may set its own)")
    logprobs: int = Field(10, ge=1, le=20, description="top-K logprobs per token (vLLM's default cap is 20)")
    concurrency: int = Field(1, ge=1, description="evaluation requests in flight; 1 keeps batches alike across "
                                                  "trials, so batch-dependent kernels do not pose as drift")
    timeout_s: float = Field(600.0, gt=0, description="the whole evaluation")
    request_timeout_s: float = Field(120.0, gt=0, description="one evaluation request")
    min_exact_match: float | None = Field(None, ge=0, le=1, description="share of greedy continuations equal "
                                                                        "to the baseline's")
    min_first_divergence: float | None = Field(None, ge=0, description="mean tokens before the first "
                                                                       "difference from the baseline")
    max_mean_kl: float | None = Field(None, ge=0, description="mean per-token KL(baseline ‖ trial), nats, top-K")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="task accuracy below the baseline's, "
                                                                          "as a fraction (0.05 = 5 points)")

    @model_validator(mode="after")
    def _files(self, info: ValidationInfo) -> "QualitySpec":
        if self.max_accuracy_drop is not None and not self.tasks:
            _fail("quality", [(("max_accuracy_drop",), "max_accuracy_drop needs tasks (a JSONL of prompts with "
                                                       "expected answers, e.g. tasks: builtin:facts)")])
        base = _base_dir(info)
        if base is None:
            return self
        from servetune.optimizer.evalset import EvalSetError, load

        for key, kind in (("eval_set", "compare"), ("tasks", "task")):
            src = getattr(self, key)
            if src is None:
                continue
            try:
                load(src, kind, self.max_tokens, base)
            except EvalSetError as e:
                _fail("quality", [((key,), str(e))])
        return self


class BudgetSpec(_Strict):
    trials: int = Field(20, ge=1, le=MAX_TRIALS)
    wall_time_s: float | None = Field(None, gt=0, le=MAX_WALL_S, description="no trial starts after this; one still "
                                      "waiting for GPUs then is queued again for a resumed run")
    parallel: int = Field(1, ge=1, le=MAX_GPUS, description="trials running at once")
    max_failures: int | None = Field(None, ge=1, le=MAX_TRIALS, description="stop after this many failed trials")
    repeats: int = Field(0, ge=0, le=20, description="re-measure the Pareto candidates this many more times "
                                                     "(fresh launches) once the search budget is spent")
    repeat_top: int = Field(3, ge=1, le=1000, description="at most this many Pareto candidates are repeated")


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=MAX_NAME)
    model: ModelSpec
    engines: list[EngineSpec] = Field(min_length=1)
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    search: dict[str, Domain] = Field(default_factory=dict)
    workload: WorkloadSpec
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec)
    quality: QualitySpec | None = Field(None, description="compare every trial's greedy answers with the "
                                                          "baseline's; limits make drifting trials infeasible")
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite:///<output_dir>/study.db; "
                                "a password only as ${NAME} (postgresql://user:${PGPASSWORD}@host/db)")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="spread the study over a Ray cluster: "
                                 "its address, how trial files come home, GPU types per node (docs/cluster.md)")
    output_dir: str | None = Field(None, description="default runs/<name>, relative to the working directory")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    baseline: bool = Field(True, description="run the engine's defaults first, for comparison")
    host: str = Field("127.0.0.1", description="address servers bind; loopback unless you need otherwise")
    cost_per_gpu_hour: float | None = Field(None, ge=0, le=10_000, description="USD per GPU-hour")

    # Where the study file lives; relative paths in it are resolved from there.
    source: str | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, v: Any) -> Any:
        # `search:` with every entry commented out reads as null: treat it as absent
        if isinstance(v, dict):
            v = {k: x for k, x in v.items()
                 if not (x is None and k in ("hardware", "search", "sampler", "budget", "fidelity", "cluster"))}
        return v

    @field_validator("engines", mode="before")
    @classmethod
    def _engine_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": e} if isinstance(e, str) else e for e in v]
        return v

    @field_validator("engines")
    @classmethod
    def _engines_once(cls, v: list[EngineSpec]) -> list[EngineSpec]:
        seen: dict[str, int] = {}
        errs = []
        for i, e in enumerate(v):
            if e.name in seen:
                errs.append(((i,), f"engine {e.name!r} is listed twice (first at engines[{seen[e.name]}]); "
                                   "a study compares different engines"))
            seen.setdefault(e.name, i)
        if errs:
            _fail("engines", errs)
        return v

    @field_validator("search", mode="before")
    @classmethod
    def _domains(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, dict):
            return v  # the type error is reported by pydantic
        params = _parameters()
        errs: list[tuple[tuple, str]] = []
        for key, dom in v.items():
            if key not in params:
                errs.append(((key,), f"unknown parameter {key!r}{_did_you_mean(key, params)}"))
                continue
            errs += _check_domain(key, dom, _pget(params[key], "type"))
        for key, dom in v.items():
            parent = _pget(params.get(key, {}), "requires") if key in params else None
            if not parent:
                continue
            if parent not in v:
                errs.append(((key,), f"{key} is only used when {parent} is on, and {parent} is not searched; "
                                     f"add {parent} to search (e.g. {parent}: [none, ...])"))
            elif all(_is_off(x) for x in _values(v[parent])):
                errs.append(((key,), f"{key} is only used when {parent} is on, and every value of "
                                     f"search.{parent} is off"))
        hw = info.data.get("hardware")
        if not errs and isinstance(hw, HardwareSpec):
            errs += _gpu_errors(v, hw)
        if errs:
            _fail("search", errs)
        return v

    @field_validator("storage")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError(f"{v!r} is not a storage URL; e.g. sqlite:///runs/study.db or "
                             "postgresql://user@host/db (leave storage out for the default)")
        if v is not None:
            from servetune.optimizer.storage_url import literal_password_error

            # a literal password first: it is reported whether or not the driver is installed
            why = literal_password_error(v) or _storage_problem(v)
            if why:
                raise ValueError(why)
        return v

    @field_validator("output_dir")
    @classmethod
    def _dir(cls, v: str | None) -> str | None:
        if v is not None:
            long = [part for part in Path(os.path.expanduser(v)).parts if len(part.encode()) > 255]
            if long:
                raise ValueError(f"the directory name {_describe(long[0])} is {len(long[0].encode())} bytes; a "
                                 "file system takes at most 255")
            if len(v.encode()) > 3000:
                raise ValueError(f"the path is {len(v.encode())} bytes; give one of at most 3000")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "StudySpec":
        errs: list[tuple[tuple, str]] = []
        scen = {s.label: s for s in self.workload.scenarios}
        names = list(scen)
        seen: dict[tuple[str, str], int] = {}
        for i, o in enumerate(self.objectives):
            if o.scenario is not None and o.scenario not in scen:
                errs.append((("objectives", i, "scenario"),
                             f"{o.scenario!r} is not a scenario (have: {', '.join(names)})"
                             f"{_did_you_mean(o.scenario, names)}"))
                continue
            s = scen[o.scenario] if o.scenario is not None else self.workload.scenarios[0]
            if o.metric == "goodput_request_per_s" and s.sla is None:
                errs.append((("objectives", i, "metric"),
                             f"goodput counts requests within the SLA, and scenario {s.label!r} has no sla; "
                             "give it one (e.g. sla: {preset: llama3.1-8b})"))
            if o.metric == "usd_per_million_tokens" and self.cost_per_gpu_hour is None:
                errs.append((("objectives", i, "metric"),
                             "usd_per_million_tokens needs cost_per_gpu_hour (top level, e.g. cost_per_gpu_hour: 2.5)"))
            key = (o.metric, s.label)
            if key in seen:
                errs.append((("objectives", i), f"the same objective as objectives[{seen[key]}] "
                                                f"({o.metric} on {s.label!r})"))
            seen.setdefault(key, i)
        if self.fidelity.prescreen > 1 and self.sampler.kind == "grid":
            errs.append((("fidelity", "prescreen"), "a grid sampler visits every point in order, so there is "
                                                    "nothing to pre-screen; use sampler kind tpe, nsga2, gp or "
                                                    "random, or prescreen: 0"))
        if self.quality is not None and not self.baseline:
            errs.append((("quality",), "quality compares every trial with its engine's baseline; set baseline: "
                                       "true (or remove quality)"))
        errs += self._unsupported_everywhere()
        if errs:
            _fail("StudySpec", errs)
        return self

    def _unsupported_everywhere(self) -> list[tuple[tuple, str]]:
        """Searched parameters that no engine of the study has a flag for (they would change nothing)."""
        try:
            from servetune.optimizer.catalog import load_catalog
        except ImportError:
            return []
        flags: list[set[str]] = []
        for e in self.engines:
            try:
                cat = load_catalog(e.name, e.version)
            except Exception:  # a catalog not written yet is no fault of the study
                return []
            flags.append({n for n, m in cat.params.items() if m.flag is not None})
        errs = []
        for key, dom in self.search.items():
            fixed = not isinstance(dom, (list, dict)) or (isinstance(dom, list) and len(dom) == 1)
            if not fixed and all(key not in f for f in flags):
                engines = ", ".join(e.name for e in self.engines)
                errs.append((("search", key), f"no engine of this study ({engines}) has a flag for {key}; "
                                              "searching it would change nothing"))
        return errs

    # -- derived --------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("runs", self.name))

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"

    def resolve_path(self, p: str) -> str:
        p = os.path.expanduser(p)
        if os.path.isabs(p) or not self.source:
            return p
        return str((Path(self.source).resolve().parent / p))


def _storage_problem(url: str) -> str | None:
    """Why Optuna cannot open this storage URL here (an unknown database, a driver not installed), or None."""
    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = _describe(url.split("@")[-1] if "@" in url else url)  # never echo a password
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        return (f"Optuna keeps a study in a SQL database (sqlite, postgresql, mysql); {scheme!r} is not one "
                f"(got {shown})")
    except (ArgumentError, ValueError):
        return f"not a database URL (got {shown}); e.g. sqlite:///runs/study.db or postgresql://user@host/db"
    try:
        dialect.import_dbapi()
    except ImportError as e:
        return (f"the {parsed.drivername} driver is not installed ({getattr(e, 'name', None) or e}); install "
                "it, or leave storage out for the default SQLite file")
    return None


# -- search domains ----------------------------------------------------------------------------------------

def _values(dom: Any) -> list[Any]:
    if isinstance(dom, list):
        return dom
    if isinstance(dom, dict):
        return [dom.get("low"), dom.get("high")]
    return [dom]


def _is_off(x: Any) -> bool:
    return any(x is o or (type(x) is type(o) and x == o) for o in _OFF)


def _check_value(key: str, x: Any, ptype: str | None) -> str | None:
    """Why ``x`` is not a value of parameter ``key`` (of ``ptype``), or None."""
    if x is None:
        return None  # leave the engine's default
    if ptype == "int":
        if isinstance(x, bool) or not isinstance(x, int):
            return f"{key} takes whole numbers, got {_describe(x)}"
    elif ptype == "float":
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return f"{key} takes numbers, got {_describe(x)}"
    elif ptype == "bool":
        if not isinstance(x, bool) and not (isinstance(x, str) and x.lower() in _BOOL_WORDS):
            return f"{key} is true or false, got {_describe(x)}"
        return None
    elif ptype == "str":
        if x is False:
            return None  # YAML reads `off` / `no` as false; it means "none"
        if not isinstance(x, str):
            return f"{key} takes names, got {_describe(x)}; quote it if you mean the text"
        return None
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return f"{key} takes finite numbers, got {_describe(x)}"
    if abs(x) > MAX_PARAM_INT:
        return f"{key} must be at most {MAX_PARAM_INT:,} (engines read it as a 32-bit number), got {_describe(x)}"
    lo = _PARAM_MIN.get(key)
    if lo is not None and x < lo:
        return f"{key} must be at least {_num(float(lo))}, got {_describe(x)}"
    if key == "memory_fraction" and not 0 < x <= 1:
        return f"memory_fraction is a fraction in (0, 1], got {_describe(x)}"
    return None


def _check_domain(key: str, dom: Any, ptype: str | None) -> list[tuple[tuple, str]]:
    if dom is None:
        return []
    if isinstance(dom, list):
        if not dom:
            return [((key,), "an empty list leaves nothing to search; list values or remove the key")]
        errs: list[tuple[tuple, str]] = []
        seen: list[Any] = []
        for i, x in enumerate(dom):
            if isinstance(x, (list, dict)):
                errs.append(((key, i), f"a value of {key} cannot be {_describe(x)}"))
                continue
            why = _check_value(key, x, ptype)
            if why:
                errs.append(((key, i), why))
            elif any(type(x) is type(y) and x == y for y in seen):
                errs.append(((key, i), f"{_describe(x)} is listed twice"))
            seen.append(x)
        return errs
    if isinstance(dom, dict):
        if ptype in ("bool", "str"):
            return [((key,), f"a {{low, high}} range needs a numeric parameter and {key} is a {ptype} parameter; "
                             "list the values instead")]
        try:
            r = RangeDomain.model_validate(dom)
        except ValidationError as e:
            out = []
            typos = {_close(err["loc"][-1], RangeDomain.model_fields) for err in e.errors()
                     if err["type"] == "extra_forbidden"}
            for err in e.errors():
                if err["type"] == "missing" and err["loc"][-1] in typos:
                    continue  # reported as the unknown key's "did you mean"
                loc = (key, *err["loc"])
                if err["type"] == "extra_forbidden":
                    out.append((loc, f"unknown key {err['loc'][-1]!r}"
                                     f"{_did_you_mean_or_list(err['loc'][-1], RangeDomain.model_fields)}"))
                elif err["type"] == "missing":
                    out.append((loc, f"a range needs low and high ({err['loc'][-1]} is missing)"))
                else:
                    out.append((loc, _message(err, model=RangeDomain)))
            return out
        errs = []
        if ptype == "int":
            for k in ("low", "high", "step"):
                x = dom.get(k)
                if x is not None and not (isinstance(x, int) and not isinstance(x, bool)):
                    errs.append(((key, k), f"{key} takes whole numbers, so {k} must be one (got {_describe(x)})"))
        for k in ("low", "high"):
            why = _check_value(key, dom[k], "float")
            if why and not any(e[0] == (key, k) for e in errs):
                errs.append(((key, k), why))
        if not errs and r.step is not None and r.step > r.high - r.low and r.high > r.low:
            errs.append(((key, "step"), f"step ({_num(r.step)}) is larger than the range {_num(r.low)}..{_num(r.high)}"))
        return errs
    if isinstance(dom, (int, float, str, bool)):
        why = _check_value(key, dom, ptype)
        return [((key,), why)] if why else []
    return [((key,), f"a search domain is a list of values, a {{low, high}} range or one value; "
                     f"got {type(dom).__name__}")]


def _gpu_errors(search: dict[str, Any], hw: HardwareSpec) -> list[tuple[tuple, str]]:
    cap = hw.per_trial
    what = (f"hardware.max_gpus_per_trial is {cap}" if hw.max_gpus_per_trial is not None
            else f"hardware.gpus is {cap}")
    mins: dict[str, int] = {}
    for p in _GPU_PARAMS:
        if p not in search:
            continue
        vals = [1 if x is None else x for x in _values(search[p])[:1 if isinstance(search[p], dict) else None]]
        nums = [x for x in vals if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if nums:
            mins[p] = int(min(nums))
    for p, m in mins.items():
        if m > cap:
            return [((p,), f"every value needs more GPUs than a trial may use: the smallest {p} is {m} and "
                           f"{what}; list smaller values or raise hardware.gpus / max_gpus_per_trial")]
    if len(mins) > 1 and math.prod(mins.values()) > cap:
        last = list(mins)[-1]
        prod = " x ".join(f"{p} {m}" for p, m in mins.items())
        return [((last,), f"the smallest trial needs {prod} = {math.prod(mins.values())} GPUs and {what}")]
    return []


class SpecError(Exception):
    """A study file that cannot be used; ``lines`` are ready to print (one problem per line)."""

    def __init__(self, lines: list[str]):
        lines = [re.sub(r"[ ]*[\r\n\t\v\f]+[ ]*", " ", str(x)).strip() for x in lines]
        super().__init__("\n".join(lines))
        self.lines = lines


# -- loading with line numbers ------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


def _structure_errors(root: yaml.Node) -> list[tuple[int, tuple, str]]:
    """Duplicate keys (PyYAML silently keeps the last) and keys that are not names, from the node tree."""
    errs: list[tuple[int, tuple, str]] = []
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                line = k.start_mark.line + 1
                if k.tag == _MERGE_TAG:
                    continue
                if not isinstance(k, yaml.ScalarNode):
                    errs.append((line, path, "a key must be a plain name, not a list or mapping"))
                    continue
                kp = path + (k.value,)
                if k.tag != _STR_TAG:
                    kind = k.tag.rsplit(":", 1)[-1]
                    kind = {"bool": "true/false", "int": "a number", "float": "a number", "null": "null",
                            "timestamp": "a date"}.get(kind, kind)
                    errs.append((line, kp, f"the key {k.value!r} is read as {kind}, not a name; quote it "
                                           f"(\"{k.value}\":) if you mean the text"))
                if k.value in first:
                    errs.append((line, kp, f"duplicate key {k.value!r} (first at line {first[k.value]}); "
                                           "YAML would silently keep only this last one"))
                else:
                    first[k.value] = line
                walk(v, kp)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    walk(root, ())
    return errs


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None, _stack: frozenset = frozenset()) -> dict[tuple, int]:
    """Map every key path in the YAML document to its 1-based line (keys point at the key's line)."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in _stack:  # a recursive alias
        return out
    stack = _stack | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                continue
            kp = path + (k.value,)
            _line_map(v, kp, out, stack)
            out[kp] = k.start_mark.line + 1  # later keys (overrides of a merge) win
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _line_map(v, path + (i,), out, stack)
    return out


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int:
    loc = tuple(loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _clean_loc(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's union/validator tags so the path matches the YAML."""
    out: list[Any] = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(part, str) and not isinstance(cur, (dict, list)):
            continue  # e.g. 'list[any]', 'function-after[...]' tags on a scalar
        elif isinstance(cur, dict) and isinstance(part, str) and "[" not in part:
            out.append(part)  # a missing or extra key: keep it, it names the problem
            cur = None
    return tuple(out)


_SCALAR_TAGS = ("float", "int", "str", "bool", "constrained-float", "constrained-int", "constrained-str")


def _wrong_branch(loc: tuple, data: Any) -> bool:
    """Whether a pydantic error's location passes through a union branch of another shape than the input:
    the list branch for a scalar, a scalar branch for a list."""
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        elif isinstance(part, str):
            if part.startswith("list[") and not isinstance(cur, list):
                return True
            if part in _SCALAR_TAGS and isinstance(cur, (list, dict)):
                return True
        else:
            return False
    return False


def _fmt_path(loc: tuple) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at the parent of ``loc`` (for "did you mean")."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cur = _model_in(ann)
        if cur is None:
            return []
    return [k for k in getattr(cur, "model_fields", {}) if not (cur is StudySpec and k == "source")]


def _model_in(ann: Any) -> Any:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _model_in(a)
        if m is not None:
            return m
    return None


_TYPE_WORDS = {
    "string_type": "expected text", "int_type": "expected a whole number", "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number", "float_type": "expected a number",
    "float_parsing": "expected a number", "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "list_type": "expected a list", "dict_type": "expected a mapping (key: value lines)",
    "model_type": "expected a mapping (key: value lines)", "model_attributes_type": "expected a mapping (key: value lines)",
}


def _message(err: dict, loc: tuple | None = None, model: type[BaseModel] | None = None) -> str:
    """A pydantic error as one plain sentence, with what was given (and the allowed range of a number, found
    from the field at ``loc`` of ``model``, StudySpec by default)."""
    t, msg, given = err["type"], err["msg"], err.get("input")
    if t == "spec":
        return msg
    if t == "value_error":
        return msg.removeprefix("Value error, ")
    span = _field_range(model or StudySpec, tuple(err["loc"] if loc is None else loc))
    if t in ("int_type", "int_parsing", "int_from_float", "float_type", "float_parsing") and span:
        kind = "a whole number" if t.startswith("int") else "a number"
        as_text = ""
        if isinstance(given, str) and _parses_as_number(given):
            as_text = (f": YAML reads {given} as text (write the digits, or a decimal point and a signed "
                       "exponent: 1.0e+6)")
        return f"expected {kind} {span}, got {_describe(given)}{as_text}"
    if t in _TYPE_WORDS:
        return f"{_TYPE_WORDS[t]}, got {_describe(given)}"
    if t == "literal_error":
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        return f"{_describe(given)} is not one of: {', '.join(choices)}{_did_you_mean(given, choices)}"
    if t == "too_short":
        return "needs at least one entry"
    if t == "string_pattern_mismatch" and tuple(err["loc"])[-1:] == ("name",):
        names = ("the run directory and the Optuna study" if len(err["loc"]) == 1
                 else "the scenario's request files and report columns")
        return (f"{_describe(given)} is not a usable name: letters, digits, '.', '_' and '-' only, starting "
                f"with a letter or digit (it names {names})")
    if t == "string_too_long":
        limit = (err.get("ctx") or {}).get("max_length")
        return f"is {len(str(given))} characters long; at most {limit} (got {_describe(given)})"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        if span:
            return f"must be {'a finite number ' if t == 'finite_number' else ''}{span} (got {_describe(given)})"
        return f"{msg.replace('Input should be', 'should be')} (got {_describe(given)})"
    return f"{msg} (got {_describe(given)})" if not isinstance(given, (dict, list)) else msg


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _field_range(model: type[BaseModel], loc: tuple) -> str:
    """The range a numeric field allows, in words ("from 1 to 1,000,000", "above 0 and at most 100,000"), from
    its constraints; empty when the field at ``loc`` has none."""
    import annotated_types as at
    import typing

    cur: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            break
        info = fields[part]
        cur = _model_in(info.annotation)
    if info is None or cur is not None:
        return ""
    metas = list(info.metadata)
    stack = [info.annotation]
    while stack:  # Annotated[float, Field(...)] inside a union or a list (qps, concurrency)
        a = stack.pop()
        metas += [m for x in getattr(a, "__metadata__", ()) for m in getattr(x, "metadata", [x])]
        stack += list(typing.get_args(a))
    lo = hi = None
    for m in metas:
        if isinstance(m, (at.Gt, at.Ge)):
            lo = ("above" if isinstance(m, at.Gt) else "from", getattr(m, "gt", getattr(m, "ge", None)))
        elif isinstance(m, (at.Lt, at.Le)):
            hi = ("below" if isinstance(m, at.Lt) else "at most", getattr(m, "lt", getattr(m, "le", None)))
    if lo is None and hi is None:
        return ""
    if lo and hi and lo[0] == "from" and hi[0] == "at most":
        return f"from {_big(lo[1])} to {_big(hi[1])}"
    words = {"from": "at least"}
    return " and ".join(f"{words.get(w, w)} {_big(v)}" for w, v in (b for b in (lo, hi) if b))


def _big(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else _num(float(x))


def _yaml_error(e: yaml.YAMLError, fname: str) -> SpecError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark else 1
    problem = getattr(e, "problem", None) or str(e)
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    hint = ""
    if "\\t" in problem or "'\\t'" in problem:
        hint = "; YAML indents with spaces, not tabs"
    elif "mapping values are not allowed" in problem or "expected <block end>" in problem:
        hint = "; check the indentation (keys of one mapping line up), or quote a value that contains ': '"
    where = ""
    if ctx and cmark and _differs(mark, cmark):
        where = f" ({ctx} that started at line {cmark.line + 1})"
    col = f" (column {mark.column + 1})" if mark else ""
    if "expected a single document" in str(ctx):
        return SpecError([f"{fname}:{line}: (syntax): a study file holds one YAML document; "
                          "remove the '---' and what follows, or split it into two files"])
    return SpecError([f"{fname}:{line}: (syntax): YAML syntax error: {problem}{col}{where}{hint}"])


def _differs(a: Any, b: Any) -> bool:
    return a is None or b is None or (a.line, a.column) != (b.line, b.column)


def load_study(path: str | os.PathLike, check_paths: bool = True) -> StudySpec:
    """``check_paths=False``: model.path and the dataset path are not looked for (a GPU host's study checked
    elsewhere)."""
    fname = str(path)
    try:
        text = study_yaml.read_text(fname)  # a regular file of bounded size, or a located error
    except study_yaml.StudyFileError as e:
        raise SpecError([f"{fname}:{e.line}: {e.where}: {e.message}"]) from None
    return parse_study(text, fname, check_paths=check_paths)


def parse_study(text: str, fname: str = "<study>", check_paths: bool = True) -> StudySpec:
    """Parse and validate a study's YAML text; relative paths resolve from ``fname``'s directory."""
    if len(text) > study_yaml.MAX_BYTES:
        raise SpecError([f"{fname}:1: (file): is {len(text):,} characters; a study file is at most "
                         f"{study_yaml.MAX_BYTES:,} bytes"])
    try:
        loader = study_yaml.BoundedLoader(text)  # the reader checks the text here: inside the try
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError([f"{fname}:1: (top level): the file is empty"])
            structure = _structure_errors(node) + study_yaml.value_errors(node)
            if structure:
                structure.sort(key=lambda e: e[0])
                raise SpecError(list(dict.fromkeys(f"{fname}:{line}: {_fmt_path(p)}: {m}" for line, p, m in structure)))
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except study_yaml.StudyFileError as e:
        path = study_yaml.path_of(node, e.node) if e.node is not None else None
        raise SpecError([f"{fname}:{e.line}: {_fmt_path(path) if path else e.where}: {e.message}"]) from None
    except yaml.reader.ReaderError as e:
        e2 = study_yaml.reader_error(e, text)
        raise SpecError([f"{fname}:{e2.line}: {e2.where}: {e2.message}"]) from None
    except yaml.YAMLError as e:
        raise _yaml_error(e, fname) from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. `!!int abc`: the constructor's own errors
        raise SpecError([f"{fname}:1: (syntax): cannot read a value: {e}"]) from None
    if data is None:
        raise SpecError([f"{fname}:1: (top level): the file is empty"])
    if not isinstance(data, dict):
        what = {list: "a list", str: "a single text value"}.get(type(data), f"a {type(data).__name__}")
        raise SpecError([f"{fname}:{node.start_mark.line + 1}: (top level): a study is a mapping of keys "
                         f"(name:, model:, ...), not {what}"])
    lines = _line_map(node)
    out: list[tuple[int, str]] = []
    if "source" in data:  # an internal field, never read from the file
        out.append((lines[("source",)], f"{fname}:{lines[('source',)]}: source: unknown key 'source'"))
        data = {k: v for k, v in data.items() if k != "source"}
    try:
        base_dir = str(Path(fname).resolve().parent) if not fname.startswith("<") else os.getcwd()
        spec = StudySpec.model_validate(data, context={"base_dir": base_dir} if check_paths else None)
    except ValidationError as e:
        raw = e.errors()
        # a union (`qps: 4` or a list of rates) reports every branch; keep the branch the input has the shape of
        raw = [err for err in raw if not _wrong_branch(err["loc"], data)] or raw
        errors = [(err, _clean_loc(err["loc"], data)) for err in raw]
        # a misspelled required key shows up twice (unknown + missing): keep the "did you mean" only
        typos = {(loc[:-1], _close(loc[-1], _allowed_keys(StudySpec, loc)))
                 for err, loc in errors if err["type"] == "extra_forbidden" and loc}
        for err, loc in errors:
            if err["type"] == "missing" and loc and (loc[:-1], loc[-1]) in typos:
                continue
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}{_did_you_mean_or_list(loc[-1], _allowed_keys(StudySpec, loc))}"
            elif err["type"] == "missing":
                line = _nearest_line(lines, loc[:-1])
                out.append((line, f"{fname}:{line}: {_fmt_path(loc)}: required key is missing"))
                continue
            else:
                msg = _message(err, loc)
            line = _nearest_line(lines, loc)
            out.append((line, f"{fname}:{line}: {_fmt_path(loc)}: {msg}"))
    if out:
        # one message per line/path (unions repeat themselves), in file order
        out.sort(key=lambda x: x[0])
        raise SpecError(list(dict.fromkeys(s for _, s in out)))
    spec.source = fname
    return spec


def line_of(fname: str | os.PathLike, loc: tuple) -> int:
    """The line of key path ``loc`` in the study file (its nearest parent that is written there; 1 if the file
    cannot be read): for errors found after loading, e.g. by the pre-launch checks."""
    try:
        node = yaml.compose(Path(fname).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return 1
    return _nearest_line(_line_map(node), tuple(loc)) if node is not None else 1
