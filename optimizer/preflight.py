"""Every check ``servetune run`` makes before its first launch, as ``FILE:LINE: key: message`` lines.

``validate``, ``plan`` and ``run`` all call :func:`check`, so a study ``validate`` passes is one ``run`` starts:
the model (preset or checkpoint), the GPU table, the engine catalogs' accepted values, the sampler and what it
needs (GP needs PyTorch), and the pre-launch rules over the whole search space where the space can be
enumerated (every configuration rejected is an error; some rejected is what ``plan`` reports).
"""
from __future__ import annotations

import difflib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from servetune.optimizer.driver import StudyDriver, make_sampler, resolve_model
from servetune.optimizer.engines import simulated
from servetune.optimizer.perfmodel.hardware import get_gpu
from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import line_of

# Configurations checked against the rules at most (engines × grid points); beyond it the space is too big to
# enumerate up front and the rules judge each sampled configuration as before.
ENUMERATE_LIMIT = 5_000
RANGE_POINTS = 4  # a {low, high} range is enumerated at this many points (plan's estimate, never an error)


@dataclass
class Preflight:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    driver: Any = None  # a StudyDriver (no Ray, no storage): checks and plans configurations
    configs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # the enumerated space
    exact: bool = False  # configs is the whole space (no ranges)
    rejected: Counter = field(default_factory=Counter)  # reason -> configurations it rejects
    n_rejected: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def check(spec, fname: str, *, check_paths: bool = True, enumerate_limit: int = ENUMERATE_LIMIT) -> Preflight:
    """Run every pre-launch check on a loaded study (``fname`` is its file, for line numbers)."""
    pf = Preflight()

    def error(loc: tuple, msg: str) -> None:
        pf.errors.append(f"{fname}:{line_of(fname, loc)}: {_path(loc)}: {msg}")

    shape_spec = _model(spec, check_paths, error, pf.notes)
    _gpu(spec, error, pf.notes)
    space = _space(spec, error)
    if space is not None:
        _catalog_values(spec, space, error)
        _sampler(spec, space, error)
    if pf.errors or shape_spec is None or space is None:
        return pf
    try:
        pf.driver = StudyDriver(shape_spec)
    except (ValueError, FileNotFoundError) as e:  # nothing above missed it so far; say it rather than crash
        error(("model",), str(e))
        return pf
    _rules_over_space(pf, spec, space, enumerate_limit, error)
    return pf


def _path(loc: tuple) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s


def _model(spec, check_paths: bool, error, notes: list[str]):
    """The spec whose model can be resolved (a copy with the preset, where only the path is unchecked)."""
    m = spec.model
    try:
        resolve_model(spec)
        return spec
    except (ValueError, FileNotFoundError, OSError) as e:
        if m.path and not check_paths:
            if m.preset:
                notes.append(f"model.path {m.path!r} not checked here; the rules use the shape of preset {m.preset}")
                copy = spec.model_copy(deep=True)
                copy.model.path = None
                try:
                    resolve_model(copy)
                    return copy
                except ValueError as e2:
                    error(("model", "preset"), str(e2))
                    return None
            notes.append(f"model.path {m.path!r} not checked here, so the rules that need the model's shape "
                         "(heads, weights, KV) were not run over the space; give model.preset too to run them")
            return None
        error(("model", "path") if m.path else ("model", "preset"), str(e))
        return None


def _gpu(spec, error, notes: list[str]) -> None:
    """The GPU table gives memory (unless gpu_memory_gib does) and the sim's and estimator's timing."""
    hw = spec.hardware
    try:
        get_gpu(hw.gpu)
    except ValueError as e:
        sim = any(simulated(e_.name) for e_ in spec.engines)
        if hw.gpu_memory_gib is None or sim or spec.fidelity.prescreen > 1:
            why = ("the sim and the estimator time it from the table" if sim or spec.fidelity.prescreen > 1
                   else "the memory rules need its memory: give hardware.gpu_memory_gib for a GPU not in the table")
            error(("hardware", "gpu"), f"{e} ({why})")
        else:
            notes.append(f"hardware.gpu {hw.gpu!r} is not in the GPU table: memory from gpu_memory_gib "
                         f"({hw.gpu_memory_gib:g} GiB); rules that depend on the GPU generation are skipped")


def _space(spec, error):
    try:
        return SearchSpace([e.name for e in spec.engines], spec.search, {e.name: e.version for e in spec.engines})
    except (ValueError, KeyError, FileNotFoundError) as e:
        error(("engines",), f"cannot read an engine catalog: {e}")
        return None


def _catalog_values(spec, space, error) -> None:
    """A searched value no engine of the study accepts: refused now, not as a failed launch (bad_args)."""
    for name, dim in space.dimensions.items():
        if dim.choices is None:
            continue
        listed = isinstance(spec.search.get(name), list)
        for i, v in enumerate(dim.choices):
            maps = [space.catalogs[e].params.get(name) for e in space.engines]
            maps = [m for m in maps if m is not None]
            if not maps or any(m.accepts(v) for m in maps):
                continue
            known = sorted({c for m in maps for c in m.choices})
            close = difflib.get_close_matches(str(v), known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            engines = ", ".join(e if simulated(e) else f"{e} {space.catalogs[e].version}" for e in space.engines)
            error(("search", name, i) if listed else ("search", name),
                  f"{v!r} is not a {name} that {engines} accepts{hint}; known: {', '.join(known)}")


def _sampler(spec, space, error) -> None:
    try:  # what run does when it opens the study (gp: PyTorch must be importable)
        make_sampler(spec, space, len(spec.objectives))
    except (ValueError, ImportError) as e:
        error(("sampler", "kind"), str(e))


def _rules_over_space(pf: Preflight, spec, space, limit: int, error) -> None:
    """The pre-launch rules over every configuration (ranges at a few points); all rejected is an error."""
    pf.exact = all(d.choices is not None for d in space.dimensions.values())
    per_engine = math.prod(len(d.grid(RANGE_POINTS)) for d in space.dimensions.values())
    if per_engine * len(space.engines) > limit:
        pf.notes.append(f"the space has over {limit:,} configurations: the rules judge each sampled one")
        return
    grid = space.grid(RANGE_POINTS)
    pf.configs = [(e, p) for e in space.engines for p in grid]
    for engine, params in pf.configs:
        reasons = pf.driver.check(engine, params)
        if reasons:
            pf.n_rejected += 1
            pf.rejected.update(reasons)
    if pf.exact and pf.configs and pf.n_rejected == len(pf.configs):
        top = "; ".join(f"{why} ({n})" for why, n in pf.rejected.most_common(3))
        which = ("the only configuration" if len(pf.configs) == 1
                 else f"every one of the {len(pf.configs)} configurations")
        error(("search",), f"{which} of the space is rejected before launch, so no trial could run: {top}")
