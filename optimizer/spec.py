"""The study file: a pydantic model of study.yaml, loaded with errors that point at the YAML line.

Every command that reads a study goes through :func:`load_study`. A bad file raises :class:`SpecError`,
whose lines read ``FILE:LINE: path.to.key: message``; the CLI prints them and exits 2, never a traceback.

Checks that need the file system (``model.path``, ``workload.dataset.path``) run only when a study is
loaded from text (:func:`parse_study` / :func:`load_study`): relative paths are resolved from the study
file's directory then. ``StudySpec.model_validate`` on plain data (a worker re-reading a plan) skips them.

This module is the import point; the schema lives in :mod:`~servetune.optimizer.spec_serving` and
:mod:`~servetune.optimizer.spec_workload`, the ``search:`` checks in :mod:`~servetune.optimizer.spec_domains`,
and the located-error engine in :mod:`~servetune.optimizer.spec_errors`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from servetune.loadgen.scenario_kinds import SCENARIOS
from servetune.loadgen.sla import SLA_PRESETS
from servetune.optimizer import study_yaml
from servetune.optimizer.catalog import load_catalog
from servetune.optimizer.spec_base import (
    MAX_CONCURRENCY,
    MAX_GPUS,
    MAX_NAME,
    MAX_PARAM_INT,
    MAX_QPS,
    MAX_REQUESTS,
    MAX_SECONDS,
    MAX_SEED,
    MAX_TOKENS,
    MAX_TRIALS,
    MAX_WALL_S,
    StrictModel,
)
from servetune.optimizer.spec_domains import Domain, RangeDomain, search_errors
from servetune.optimizer.spec_errors import (
    SpecError,
    describe,
    did_you_mean,
    fail,
    fail_repeats,
    fmt_path,
    line_map,
    nearest_line,
    structure_errors,
    validation_lines,
    yaml_error,
)
from servetune.optimizer.spec_serving import (
    ENGINES,
    BudgetSpec,
    ClusterSpec,
    EngineSpec,
    FidelitySpec,
    HardwareSpec,
    ModelSpec,
    NodeTypeSpec,
    QualitySpec,
    SamplerSpec,
)
from servetune.optimizer.spec_workload import (
    METRICS,
    AuditSpec,
    DatasetSpec,
    MaxQPSSpec,
    ObjectiveSpec,
    ScenarioSpec,
    SLASpec,
    WarmupSpec,
    WorkloadSpec,
    rate_bracket,
    rate_floor,
)
from servetune.optimizer.storage_url import literal_password_error

__all__ = [
    "ENGINES", "SCENARIOS", "SLA_PRESETS", "METRICS", "MAX_CONCURRENCY", "MAX_GPUS", "MAX_NAME", "MAX_PARAM_INT",
    "MAX_QPS", "MAX_REQUESTS", "MAX_SECONDS", "MAX_SEED", "MAX_TOKENS", "MAX_TRIALS", "MAX_WALL_S",
    "AuditSpec", "BudgetSpec", "ClusterSpec", "DatasetSpec", "Domain", "EngineSpec", "FidelitySpec",
    "HardwareSpec", "MaxQPSSpec", "ModelSpec", "NodeTypeSpec", "ObjectiveSpec", "QualitySpec", "RangeDomain",
    "SamplerSpec", "ScenarioSpec", "SLASpec", "SpecError", "StudySpec", "WarmupSpec", "WorkloadSpec",
    "line_of", "load_study", "parse_study", "rate_bracket", "rate_floor",
]



class StudySpec(StrictModel):
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
        fail_repeats("engines", [e.name for e in v],
                     lambda k, i: f"engine {k!r} is listed twice (first at engines[{i}]); a study compares "
                                  "different engines")
        return v

    @field_validator("search", mode="before")
    @classmethod
    def _domains(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, dict):
            return v  # the type error is reported by pydantic
        errs = search_errors(v, info.data.get("hardware"))
        if errs:
            fail("search", errs)
        return v

    @field_validator("storage")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError(f"{v!r} is not a storage URL; e.g. sqlite:///runs/study.db or "
                             "postgresql://user@host/db (leave storage out for the default)")
        if v is not None:
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
                raise ValueError(f"the directory name {describe(long[0])} is {len(long[0].encode())} bytes; a "
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
                             f"{did_you_mean(o.scenario, names)}"))
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
            fail("StudySpec", errs)
        return self

    def _unsupported_everywhere(self) -> list[tuple[tuple, str]]:
        """Searched parameters that no engine of the study has a flag for (they would change nothing)."""
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
    def objective_keys(self) -> list[tuple[str, str]]:
        """(scenario label, metric) of each objective, in order: the one spelling of which scenario an
        objective without ``scenario:`` measures (the first)."""
        first = self.workload.scenarios[0].label
        return [(o.scenario or first, o.metric) for o in self.objectives]

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
    # CLI start-up time: sqlalchemy takes ~0.2 s to import (measured), and only a study with storage: pays it
    from sqlalchemy.engine.url import make_url  # noqa: PLC0415 — CLI start-up time (above)
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError  # noqa: PLC0415 — CLI start-up time (above)

    shown = describe(url.split("@")[-1] if "@" in url else url)  # never echo a password
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
            structure = structure_errors(node) + study_yaml.value_errors(node)
            if structure:
                structure.sort(key=lambda e: e[0])
                raise SpecError(list(dict.fromkeys(f"{fname}:{line}: {fmt_path(p)}: {m}" for line, p, m in structure)))
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except study_yaml.StudyFileError as e:
        # an error about a value comes from construct_document, so the document's node is there
        path = study_yaml.path_of(node, e.node) if e.node is not None and node is not None else None
        raise SpecError([f"{fname}:{e.line}: {fmt_path(path) if path else e.where}: {e.message}"]) from None
    except yaml.reader.ReaderError as e:
        e2 = study_yaml.reader_error(e, text)
        raise SpecError([f"{fname}:{e2.line}: {e2.where}: {e2.message}"]) from None
    except yaml.YAMLError as e:
        raise yaml_error(e, fname) from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. `!!int abc`: the constructor's own errors
        raise SpecError([f"{fname}:1: (syntax): cannot read a value: {e}"]) from None
    if data is None:
        raise SpecError([f"{fname}:1: (top level): the file is empty"])
    if not isinstance(data, dict):
        what = ("a list" if isinstance(data, list) else "a single text value" if isinstance(data, str)
                else f"a {type(data).__name__}")
        raise SpecError([f"{fname}:{node.start_mark.line + 1}: (top level): a study is a mapping of keys "
                         f"(name:, model:, ...), not {what}"])
    lines = line_map(node)
    out: list[tuple[int, str]] = []
    if "source" in data:  # an internal field, never read from the file
        out.append((lines[("source",)], f"{fname}:{lines[('source',)]}: source: unknown key 'source'"))
        data = {k: v for k, v in data.items() if k != "source"}
    try:
        base_dir = str(Path(fname).resolve().parent) if not fname.startswith("<") else os.getcwd()
        spec = StudySpec.model_validate(data, context={"base_dir": base_dir} if check_paths else None)
    except ValidationError as e:
        out += validation_lines(e, data, lines, fname, StudySpec)
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
    return nearest_line(line_map(node), tuple(loc)) if node is not None else 1
