"""Resuming a study: the study file is compared with the copy kept in the run directory.

A resumed study keeps its measured trials and reuses them for configurations it samples again, so the
study must still measure the same thing. A change to what is measured (model, engines, hardware, workload,
scenarios, SLA, objectives, seed) or to the searched domains is refused with the difference shown; the user
starts a fresh study instead (``servetune run --new``, or another ``name:``). A change that only steers the
search (budget, sampler, fidelity, baseline, timeouts) is allowed and listed.

A second guard covers storage shared outside the run directory: the searched distributions must be the ones
the stored trials were sampled from, so Optuna's "CategoricalDistribution does not support dynamic value
space" never surfaces and no empty failed trial is left behind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from pydantic import ValidationError

from servetune.optimizer import run_dir as rd
from servetune.optimizer.spec import StudySpec

# Top-level keys whose change leaves the results comparable. Everything else is refused.
ALLOWED = ("budget", "sampler", "fidelity", "baseline", "host")
# Keys inside an engine entry that do not change a measurement.
ENGINE_ALLOWED = ("ready_timeout_s",)
# How the run directory was found, not what it measures.
IGNORED = ("output_dir",)
_WHAT = {"search": "the searched domains", "name": "the study name (its trials live in this directory)",
         "storage": "the Optuna storage", "seed": "the seed of the arrival schedules",
         "cost_per_gpu_hour": "cost_per_gpu_hour"}


class StudyChanged(Exception):
    """The study file differs from the run's in what it measures; ``lines`` say how (ready to print)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Comparison:
    stored: Path | None = None  # the run's study.yaml, when there is a run to resume
    refused: list[str] = field(default_factory=list)  # "path: old → new"
    allowed: list[str] = field(default_factory=list)

    def refusal(self, source: str | None) -> list[str]:
        assert self.stored is not None  # compare() refuses only where a stored study was read
        what = sorted({_section(line) for line in self.refused})
        lines = [f"{source or 'the study'}: refusing to resume {self.stored.parent}: the study file changes "
                 f"{', '.join(_WHAT.get(w, 'the ' + w) for w in what)} since the trials there were measured:"]
        lines += [f"  {line}" for line in self.refused]
        lines.append("the kept trials would be mixed with results measured differently: start a fresh study "
                     f"with `servetune run {source or 'STUDY'} --new` (a new name and run directory), or give the "
                     f"study another name:, or put back the stored file ({self.stored})")
        return lines


def _section(line: str) -> str:
    head = line.split(":", 1)[0]
    return head.split(".", 1)[0].split("[", 1)[0]


def has_results(run_dir: Path) -> bool:
    return rd.has_records(run_dir)


def _normalized(data: Any) -> dict[str, Any]:
    """A study as plain data with every default filled in, so `gpus: 1` and no `gpus:` compare equal. A file
    the current schema no longer reads is compared as written."""
    if not isinstance(data, dict):
        return {}
    try:  # without a base_dir context: paths are compared as written, not checked on this machine
        return StudySpec.model_validate({k: v for k, v in data.items() if k != "source"}).model_dump(mode="json")
    except ValidationError:
        return dict(data)


def _flatten(x: Any, path: str = "") -> dict[str, Any]:
    if isinstance(x, dict) and x:
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flatten(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(x, list) and x and any(isinstance(v, (dict, list)) for v in x):
        out = {}
        for i, v in enumerate(x):
            out.update(_flatten(v, f"{path}[{i}]"))
        return out
    return {path: x}


def _show(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    return json.dumps(v, default=str)


_ABSENT = object()


def _allowed(path: str) -> bool:
    top = path.split(".", 1)[0].split("[", 1)[0]
    if top in ALLOWED:
        return True
    if top == "engines" and path.rsplit(".", 1)[-1] in ENGINE_ALLOWED:
        return True
    return False


def diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between two normalized studies, as ``path: old → new`` lines."""
    a = {k: v for k, v in _flatten(old).items() if k.split(".", 1)[0] not in IGNORED}
    b = {k: v for k, v in _flatten(new).items() if k.split(".", 1)[0] not in IGNORED}
    refused: list[str] = []
    allowed: list[str] = []
    for path in list(a) + [q for q in b if q not in a]:  # in file order
        va, vb = a.get(path, _ABSENT), b.get(path, _ABSENT)
        if va == vb or (va in (_ABSENT, None, {}, []) and vb in (_ABSENT, None, {}, [])):
            continue
        line = f"{path}: {_show(va)} → {_show(vb)}"
        (allowed if _allowed(path) else refused).append(line)
    return refused, allowed


def compare(spec) -> Comparison:
    """The study ``spec`` against the study kept in its run directory (nothing to compare: an empty result)."""
    stored = rd.study_file(spec.run_dir)
    if not stored.is_file() or not has_results(spec.run_dir):
        return Comparison()
    try:
        old = yaml.safe_load(stored.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return Comparison(stored=stored, refused=[f"(file): the stored {stored} cannot be read"])
    new = spec.model_dump(mode="json")
    refused, allowed = diff(_normalized(old), _normalized(new))
    return Comparison(stored=stored, refused=refused, allowed=allowed)


def fresh_name(spec) -> tuple[str, str | None]:
    """A name (and output_dir, where the study sets one) no earlier run uses: NAME-2, NAME-3, ..."""
    for k in range(2, 10_000):
        name = f"{spec.name}-{k}"
        out = f"{spec.output_dir.rstrip('/')}-{k}" if spec.output_dir else None
        run_dir = Path(out) if out else Path("runs") / name
        if not run_dir.exists():
            return name, out
    raise RuntimeError("no free study name")  # pragma: no cover - ten thousand runs of one study


def check_distributions(study, space) -> None:
    """Refuse a search space whose distributions differ from those the stored trials were sampled from."""
    wanted = space.distributions()
    seen: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            seen.setdefault(name, dist)
    lines = []
    for name, dist in seen.items():
        new = wanted.get(name)
        if new is None:
            continue
        try:
            optuna.distributions.check_distribution_compatibility(dist, new)
        except ValueError:
            lines.append(f"  search.{name}: {_describe(dist)} → {_describe(new)}")
    if lines:
        raise StudyChanged([f"refusing to resume study {study.study_name!r}: its stored trials were sampled "
                            "from other search domains:", *lines,
                            "start a fresh study with `servetune run STUDY --new` (a new name and run directory), "
                            "or give the study another name:"])


def _describe(d) -> str:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return json.dumps(list(d.choices), default=str)
    low, high = getattr(d, "low", None), getattr(d, "high", None)
    return f"{{low: {low}, high: {high}{', log: true' if getattr(d, 'log', False) else ''}}}"
