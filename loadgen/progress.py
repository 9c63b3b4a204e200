"""Where a load-generator run is, for whoever shows progress: a level starts, its measured part starts (after
the warm-up), it ends.

Listeners are plain callables ``fn(event, data)`` registered in this process; the load generator never waits
on them and a failing listener never fails a run. Events:

- ``level_start``: ``{"settings": ScenarioSettings, "dataset_size": int}`` (warm-up requests, if any, go first)
- ``measuring``: ``{}`` (t0 of the level: the warm-up is done; single-process runs only)
- ``level_done``: ``{"settings": ScenarioSettings, "summary": dict, "valid": bool}``
- ``launch_warmup``: ``{"why": str, "round": int, "top": int, "ends_by": float, "compiles": [int, ...]}`` (a
  round of a launch's warm-up begins; ``ends_by``: the warm-up's bound, epoch seconds; ``compiles``: the compile
  lines of each earlier round; optimizer.warmup)
- ``launch_warmup_done``: ``{"why": str, "rounds": int, "seconds": float, "stopped_because": str}``
"""
from __future__ import annotations

from typing import Any, Callable

from servetune.loadgen.scenario_kinds import OPEN_LOOP

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []


def add(fn: Listener) -> None:
    _listeners.append(fn)


def remove(fn: Listener) -> None:
    try:
        _listeners.remove(fn)
    except ValueError:
        pass


def emit(event: str, **data: Any) -> None:
    for fn in list(_listeners):
        try:
            fn(event, data)
        except Exception:  # progress is for people: it never breaks a measurement
            pass


def level_seconds(settings: Any) -> float | None:
    """How long a level's measured part is scheduled to take (open loops and duration-bound closed loops);
    None where it depends on the server's speed (offline, a request-count-bound closed loop)."""
    kind = getattr(settings, "kind", None)
    dur = getattr(settings, "duration_s", None) or 0.0
    n = getattr(settings, "num_requests", None) or 0
    if kind in OPEN_LOOP:
        qps = getattr(settings, "qps", None)
        return max(dur, n / qps) if qps else (dur or None)
    return dur or None
