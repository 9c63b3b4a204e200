"""The search space: the study's ``search:`` domains (or the catalog's) as Optuna suggestions.

Conditional parameters (``requires:`` in parameters.yaml) are only suggested when their parent is on, so
TPE never wastes samples on a speculative token count for a config that does not speculate.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import optuna

from servetune.optimizer.catalog import Catalog, load_catalog
from servetune.optimizer.parameters import PARAMETERS, is_off


@dataclass(frozen=True)
class Dimension:
    name: str
    choices: tuple | None = None  # categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    is_int: bool = False

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def bounds(self) -> tuple[float, float]:
        """(low, high) of a range dimension."""
        assert self.low is not None and self.high is not None  # _dimension gives every non-categorical both
        return self.low, self.high

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        low, high = self.bounds()
        if self.is_int:
            return optuna.distributions.IntDistribution(int(low), int(high), log=self.log, step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(low, high, log=self.log, step=self.step)

    def grid(self, points: int = 4) -> list[Any]:
        if self.choices is not None:
            return list(self.choices)
        low, high = self.bounds()
        if self.is_int and not self.log:
            ints = list(range(int(low), int(high) + 1, int(self.step or 1)))
            if len(ints) <= points:
                return ints
        if self.log:
            vals = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (points - 1))
                    for i in range(points)]
        else:
            vals = [low + i * (high - low) / (points - 1) for i in range(points)]
        return sorted({int(round(v)) for v in vals}) if self.is_int else vals


def _dimension(name: str, domain: Any) -> Dimension:
    ptype = PARAMETERS[name]["type"]
    if isinstance(domain, dict):
        is_int = ptype == "int"
        return Dimension(name, low=domain["low"], high=domain["high"], step=domain.get("step"),
                         log=bool(domain.get("log", False)), is_int=is_int)
    if isinstance(domain, list):
        return Dimension(name, choices=tuple(_coerce(ptype, v) for v in domain))
    return Dimension(name, choices=(_coerce(ptype, domain),))


def _coerce(ptype: str, v: Any) -> Any:
    if v is None:
        return None
    if ptype == "str":
        return "none" if v is False else str(v)
    if ptype == "bool" and isinstance(v, str):
        return v.lower() in ("1", "true", "yes", "on")
    return v


class SearchSpace:
    """Dimensions per engine; ``engine`` itself is a dimension when the study names several, and ``gpu`` when
    a heterogeneous cluster offers several GPU types (``cluster.node_types``)."""

    def __init__(self, engines: list[str], search: dict[str, Any], versions: dict[str, str | None] | None = None,
                 gpu_types: list[str] | None = None):
        self.engines = list(engines)
        self.gpu_types = list(gpu_types or []) if len(gpu_types or []) > 1 else []
        self.catalogs: dict[str, Catalog] = {e: load_catalog(e, (versions or {}).get(e)) for e in engines}
        domains = dict(search)
        if not domains:  # nothing given: search the catalog's own defaults (first engine's)
            domains = self.catalogs[self.engines[0]].default_domains()
        self.dimensions: dict[str, Dimension] = {n: _dimension(n, d) for n, d in domains.items()}

    def unsupported(self, engine: str) -> list[str]:
        """Searched parameters this engine has no flag for."""
        cat = self.catalogs[engine]
        return [n for n, d in self.dimensions.items()
                if (n not in cat.params or cat.params[n].flag is None) and not d.fixed]

    def baseline(self, engine: str) -> dict[str, Any]:
        """The engine's defaults, restricted to the searched parameters (what Optuna is told)."""
        defaults = self.catalogs[engine].defaults()
        out: dict[str, Any] = {}
        for name, dim in self.dimensions.items():
            if name in defaults and self._active(name, {**defaults, **out}):
                out[name] = defaults[name]
        if len(self.engines) > 1:
            out["engine"] = engine
        if self.gpu_types:
            out["gpu"] = self.gpu_types[0]
        return out

    def suggest(self, trial: optuna.Trial) -> tuple[str, dict[str, Any]]:
        engine = self.engines[0]
        if len(self.engines) > 1:
            engine = trial.suggest_categorical("engine", self.engines)
        params: dict[str, Any] = {}
        if self.gpu_types:
            params["gpu"] = trial.suggest_categorical("gpu", self.gpu_types)
        for name, dim in self._ordered():
            if not self._active(name, params):
                continue
            params[name] = _suggest(trial, dim)
        return engine, params

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        d = {n: dim.distribution() for n, dim in self.dimensions.items()}
        if len(self.engines) > 1:
            d["engine"] = optuna.distributions.CategoricalDistribution(self.engines)
        if self.gpu_types:
            d["gpu"] = optuna.distributions.CategoricalDistribution(self.gpu_types)
        return d

    def grid(self, points: int = 4) -> list[dict[str, Any]]:
        """Every combination (conditional children collapse when their parent is off)."""
        names = [n for n, _ in self._ordered()]
        seen: set[tuple] = set()
        out = []
        for combo in itertools.product(*(self.dimensions[n].grid(points) for n in names)):
            p: dict[str, Any] = {}
            for n, v in zip(names, combo):
                if self._active(n, p):
                    p[n] = v
            key = tuple(sorted(p.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                out.append(p)
        return out

    def _ordered(self):
        # parents before children so `requires` can be checked against already-chosen values
        return sorted(self.dimensions.items(), key=lambda kv: 1 if PARAMETERS[kv[0]].get("requires") else 0)

    @staticmethod
    def _active(name: str, chosen: dict[str, Any]) -> bool:
        parent = PARAMETERS[name].get("requires")
        return parent is None or not is_off(chosen.get(parent))


def _suggest(trial: optuna.Trial, dim: Dimension) -> Any:
    if dim.choices is not None:
        return trial.suggest_categorical(dim.name, dim.choices)
    low, high = dim.bounds()
    if dim.is_int:
        return trial.suggest_int(dim.name, int(low), int(high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(dim.name, low, high, step=dim.step, log=dim.log)
