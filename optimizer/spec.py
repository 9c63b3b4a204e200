"""The study file: a pydantic model of study.yaml, loaded with errors that point at the YAML line.

Every command that reads a study goes through :func:`load_study`. A bad file raises :class:`SpecError`,
whose lines read ``FILE:LINE: path.to.key: message``; the CLI prints them and exits 2, never a traceback.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENGINES = ("sim", "vllm", "sglang")
SCENARIOS = ("offline", "server", "interactive", "single_stream")

# MLPerf LLM latency limits (p99 TTFT ms, p99 TPOT ms); loadgen-and-mlperf.md §1.5.
SLA_PRESETS: dict[str, tuple[float, float]] = {
    "llama3.1-8b": (2000.0, 100.0),
    "llama3.1-8b-interactive": (500.0, 30.0),
    "llama2-70b": (2000.0, 200.0),
    "llama2-70b-interactive": (450.0, 40.0),
    "llama3.1-405b": (6000.0, 175.0),
    "llama3.1-405b-interactive": (4500.0, 80.0),
    "mixtral-8x7b": (2000.0, 200.0),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(_Strict):
    preset: str | None = Field(None, description="built-in shape: llama-3.2-1b, llama-3.1-8b, llama-3.1-70b, mixtral-8x7b")
    path: str | None = Field(None, description="checkpoint directory with config.json (what a real engine loads)")
    name: str | None = Field(None, description="served model name; defaults to the preset or directory name")
    load_format: str | None = Field(None, description="e.g. 'dummy' for random weights of the real shape")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if not self.preset and not self.path:
            raise ValueError("give model.preset (a built-in shape) or model.path (a checkpoint directory)")
        return self


class HardwareSpec(_Strict):
    gpu: str = Field("h100", description="GPU kind: h100, h200, a100, l40s, ... (sim timing and memory rules)")
    gpus: int = Field(1, ge=1, le=1024, description="GPUs the study may use on this host or cluster")
    max_gpus_per_trial: int | None = Field(None, ge=1)
    gpu_memory_gib: float | None = Field(None, gt=0, description="override the GPU table's memory")

    @model_validator(mode="after")
    def _per_trial(self) -> "HardwareSpec":
        if self.max_gpus_per_trial is not None and self.max_gpus_per_trial > self.gpus:
            raise ValueError(f"max_gpus_per_trial ({self.max_gpus_per_trial}) exceeds gpus ({self.gpus})")
        return self


class EngineSpec(_Strict):
    name: Literal["sim", "vllm", "sglang"]
    command: list[str] | None = Field(None, description="how to start it, e.g. ['vllm', 'serve'] or a python path")
    version: str | None = Field(None, description="engine version whose flag mapping to use")
    extra_args: list[str] = Field(default_factory=list, description="flags passed verbatim, after the mapped ones")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment; use ${NAME} to pass a secret by name")
    ready_timeout_s: float = Field(900.0, gt=0)


Domain = Union[list[Any], dict[str, Any], int, float, str, bool, None]


class RangeDomain(_Strict):
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> "RangeDomain":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log domain needs low > 0")
        return self


class DatasetSpec(_Strict):
    kind: Literal["random", "sharegpt", "token_ids"] = "random"
    input_tokens: int = Field(512, ge=1)
    output_tokens: int = Field(128, ge=1)
    input_range: float = Field(0.0, ge=0, lt=1, description="±fraction around input_tokens (0 = fixed)")
    output_range: float = Field(0.0, ge=0, lt=1)
    num_requests: int = Field(200, ge=1)
    path: str | None = None
    seed: int = 0
    ignore_eos: bool = True

    @model_validator(mode="after")
    def _path(self) -> "DatasetSpec":
        if self.kind != "random" and not self.path:
            raise ValueError(f"a {self.kind} dataset needs path")
        return self


class SLASpec(_Strict):
    preset: str | None = Field(None, description="MLPerf limits: " + ", ".join(SLA_PRESETS))
    ttft_p99_ms: float | None = Field(None, gt=0)
    tpot_p99_ms: float | None = Field(None, gt=0)

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in SLA_PRESETS:
            raise ValueError(f"unknown SLA preset {v!r}{_did_you_mean(v, SLA_PRESETS)}")
        return v

    def limits(self) -> tuple[float | None, float | None]:
        ttft, tpot = SLA_PRESETS.get(self.preset or "", (None, None))
        return (self.ttft_p99_ms or ttft, self.tpot_p99_ms or tpot)


class ScenarioSpec(_Strict):
    kind: Literal["offline", "server", "interactive", "single_stream"]
    name: str | None = Field(None, description="defaults to kind; objectives refer to it")
    qps: float | None = Field(None, gt=0, description="server/interactive: Poisson arrival rate")
    duration_s: float | None = Field(None, gt=0, description="minimum scheduled duration")
    num_requests: int | None = Field(None, ge=1, description="defaults to the dataset size")
    max_connections: int | None = Field(None, ge=1, description="client-side cap on outstanding requests (reported)")
    warmup_requests: int = Field(0, ge=0)
    timeout_s: float = Field(600.0, gt=0, description="the whole scenario never runs past this")
    sla: SLASpec | None = None

    @model_validator(mode="after")
    def _rate(self) -> "ScenarioSpec":
        if self.kind in ("server", "interactive") and self.qps is None:
            raise ValueError(f"a {self.kind} scenario needs qps (requests per second)")
        if self.kind in ("offline", "single_stream") and self.qps is not None:
            raise ValueError(f"qps has no meaning for a {self.kind} scenario")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class WorkloadSpec(_Strict):
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    scenarios: list[ScenarioSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "WorkloadSpec":
        seen: set[str] = set()
        for s in self.scenarios:
            if s.label in seen:
                raise ValueError(f"two scenarios are named {s.label!r}; give one a name")
            seen.add(s.label)
        return self


class ObjectiveSpec(_Strict):
    metric: str
    scenario: str | None = Field(None, description="scenario name; defaults to the first scenario")
    direction: Literal["maximize", "minimize"] = "maximize"


class SamplerSpec(_Strict):
    kind: Literal["tpe", "nsga2", "random", "gp", "grid"] = "tpe"
    seed: int | None = None
    startup_trials: int | None = Field(None, ge=0)


class BudgetSpec(_Strict):
    trials: int = Field(20, ge=1)
    wall_time_s: float | None = Field(None, gt=0)
    parallel: int = Field(1, ge=1, description="trials running at once")
    max_failures: int | None = Field(None, ge=1, description="stop after this many failed trials")


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    engines: list[EngineSpec] = Field(min_length=1)
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    search: dict[str, Domain] = Field(default_factory=dict)
    workload: WorkloadSpec
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite:///<output_dir>/study.db")
    output_dir: str | None = Field(None, description="default runs/<name>, relative to the working directory")
    seed: int = 0
    baseline: bool = Field(True, description="run the engine's defaults first, for comparison")
    host: str = Field("127.0.0.1", description="address servers bind; loopback unless you need otherwise")
    cost_per_gpu_hour: float | None = Field(None, ge=0)

    # Where the study file lives; relative paths in it are resolved from there.
    source: str | None = Field(None, exclude=True)

    @field_validator("engines", mode="before")
    @classmethod
    def _engine_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": e} if isinstance(e, str) else e for e in v]
        return v

    @field_validator("search")
    @classmethod
    def _domains(cls, v: dict[str, Domain]) -> dict[str, Domain]:
        from servetune.optimizer.space import PARAMETERS

        for key, dom in v.items():
            if key not in PARAMETERS:
                raise ValueError(f"unknown parameter {key!r}{_did_you_mean(key, PARAMETERS)}")
            if isinstance(dom, dict):
                RangeDomain.model_validate(dom)
            elif isinstance(dom, list) and not dom:
                raise ValueError(f"{key}: an empty list leaves nothing to search")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "StudySpec":
        names = [s.label for s in self.workload.scenarios]
        for i, o in enumerate(self.objectives):
            if o.scenario is not None and o.scenario not in names:
                raise ValueError(f"objectives[{i}].scenario {o.scenario!r} is not a scenario "
                                 f"(have: {', '.join(names)}){_did_you_mean(o.scenario, names)}")
        return self

    # -- derived --------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("runs", self.name))

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"

    def resolve_path(self, p: str) -> str:
        if os.path.isabs(p) or not self.source:
            return p
        return str((Path(self.source).resolve().parent / p))


class SpecError(Exception):
    """A study file that cannot be used; ``lines`` are ready to print."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- loading with line numbers ------------------------------------------------------------------------------

def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path in the YAML document to its 1-based line (keys point at the key's line)."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            kp = path + (k.value,)
            out[kp] = k.start_mark.line + 1
            _line_map(v, kp, out)
            out[kp] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _line_map(v, path + (i,), out)
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
    return list(getattr(cur, "model_fields", {}).keys())


def _model_in(ann: Any) -> Any:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _model_in(a)
        if m is not None:
            return m
    return None


def load_study(path: str | os.PathLike) -> StudySpec:
    fname = str(path)
    try:
        text = Path(fname).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{fname}:1: (file): no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"{fname}:1: (file): cannot read: {e}"]) from None
    return parse_study(text, fname)


def parse_study(text: str, fname: str = "<study>") -> StudySpec:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([f"{fname}:{line}: (syntax): YAML syntax error: {problem}"]) from None
    if node is None or data is None:
        raise SpecError([f"{fname}:1: (top level): the file is empty"])
    if not isinstance(data, dict):
        raise SpecError([f"{fname}:1: (top level): a study is a mapping of keys (name:, model:, ...), "
                         f"not a {type(data).__name__}"])
    lines = _line_map(node)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        out = []
        for err in e.errors():
            loc = _clean_loc(err["loc"], data)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}{_did_you_mean(loc[-1], _allowed_keys(StudySpec, loc))}"
            elif err["type"] == "missing":
                msg = "required key is missing"
                line = _nearest_line(lines, loc[:-1])
                out.append(f"{fname}:{line}: {_fmt_path(loc)}: {msg}")
                continue
            elif err["type"] == "literal_error":
                msg += f" (got {err.get('input')!r})"
            out.append(f"{fname}:{_nearest_line(lines, loc)}: {_fmt_path(loc)}: {msg}")
        # one message per line/path: unions repeat themselves
        raise SpecError(list(dict.fromkeys(out))) from None
    spec.source = fname
    return spec
