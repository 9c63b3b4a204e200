"""The scenario kinds and their traits: one registry that every other module asks, instead of comparing names.

A kind says how its load is driven and how a run of it is judged; :mod:`~servetune.loadgen.scenarios`
issues the requests, :mod:`~servetune.loadgen.validity` judges them, the study spec checks a scenario's keys
against these traits. A new kind is one :func:`ScenarioKind.register` call here, its issue loop in
scenarios.py, and (if its load is driven in a new way) the runner's handling of that way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

# How requests are issued: all at t0 | Poisson/constant arrivals at qps | one after another | N outstanding.
Drive = Literal["all_at_once", "arrivals", "one_at_a_time", "closed_loop"]


@dataclass(frozen=True)
class ScenarioKind:
    name: str
    drive: Drive
    # latency percentile the limits are judged at (MLPerf: p99, SingleStream p90); None: limits not judged
    percentile: float | None
    # the summary key and words of the clock the minimum duration is measured by (validity)
    run_clock: tuple[str, str] = ("last_scheduled_s", "scheduled time of the last query")
    # the MLPerf SLA category: "interactive" resolves a Server preset to its -interactive sibling (loadgen.sla)
    sla_category: Literal["server", "interactive"] = "server"
    # LoadGen's SingleStream figure: the early-stopping estimate of request latency at ``percentile``
    e2e_estimate: bool = False

    _registry: ClassVar[dict[str, "ScenarioKind"]] = {}

    @classmethod
    def register(cls, kind: "ScenarioKind") -> "ScenarioKind":
        if kind.name in cls._registry:
            raise ValueError(f"scenario kind {kind.name!r} is registered twice")
        cls._registry[kind.name] = kind
        return kind

    @classmethod
    def get(cls, name: str) -> "ScenarioKind":
        try:
            return cls._registry[name]
        except KeyError:
            raise ValueError(f"unknown scenario kind {name!r}; known: {', '.join(cls._registry)}") from None

    @classmethod
    def find(cls, name: object) -> "ScenarioKind | None":
        """The kind named ``name``, or None (a run file written by another version, a typo)."""
        return cls._registry.get(name) if isinstance(name, str) else None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls._registry)

    @classmethod
    def all(cls) -> tuple["ScenarioKind", ...]:
        return tuple(cls._registry.values())

    @classmethod
    def where(cls, **traits: object) -> tuple[str, ...]:
        """Names of the kinds whose traits (or properties) equal ``traits``: ``where(open_loop=True)``."""
        return tuple(n for n, k in cls._registry.items() if all(getattr(k, t) == v for t, v in traits.items()))

    @property
    def open_loop(self) -> bool:
        """Arrivals at a rate (qps) that do not wait for completions: the rate is the load level."""
        return self.drive == "arrivals"

    @property
    def rate_key(self) -> str | None:
        """The setting that sets the load level (a sweep's levels), or None when the kind has no level."""
        return {"arrivals": "qps", "closed_loop": "concurrency"}.get(self.drive)

    @property
    def judges_latency(self) -> bool:
        return self.percentile is not None



def level_key(name: object) -> str:
    """The setting a run's load level is read from: ``concurrency`` for a closed-loop kind, else ``qps`` (also
    for a kind this version does not know: a record another version wrote)."""
    kind = ScenarioKind.find(name)
    return "concurrency" if kind is not None and kind.drive == "closed_loop" else "qps"

ScenarioKind.register(ScenarioKind("offline", "all_at_once", None, ("last_done_s", "last completion")))
ScenarioKind.register(ScenarioKind("server", "arrivals", 0.99))
ScenarioKind.register(ScenarioKind("interactive", "arrivals", 0.99, sla_category="interactive"))
ScenarioKind.register(ScenarioKind("single_stream", "one_at_a_time", 0.90, ("last_sent_s", "last issue"),
                                   e2e_estimate=True))
ScenarioKind.register(ScenarioKind("concurrency", "closed_loop", 0.99, ("last_sent_s", "last issue")))

SCENARIOS: tuple[str, ...] = ScenarioKind.names()
OPEN_LOOP: tuple[str, ...] = ScenarioKind.where(open_loop=True)


def kind(name: str) -> ScenarioKind:
    """The registered kind ``name`` (ValueError naming the known ones otherwise)."""
    return ScenarioKind.get(name)
