"""The engine-neutral parameters' facts, read once from ``search_spaces/parameters.yaml``: names, types,
dependencies, bounds and the values that mean "off". The spec, the search space and the engines ask here;
none of them spells a bound or an "off" value of its own.
"""
from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

_RAW: dict[str, Any] = yaml.safe_load(
    resources.files("servetune.search_spaces").joinpath("parameters.yaml").read_text(encoding="utf-8"))

PARAMETERS: dict[str, dict[str, Any]] = _RAW["parameters"]
OFF_VALUES: tuple[Any, ...] = tuple(_RAW["off_values"])
_OFF_WORDS = frozenset(v.lower() for v in OFF_VALUES if isinstance(v, str))
_OFF_OTHER = tuple(v for v in OFF_VALUES if not isinstance(v, str))


def is_off(value: Any) -> bool:
    """Whether ``value`` leaves its feature off: null, false, a zero, or an "off" word in any case."""
    if isinstance(value, str):
        return value.lower() in _OFF_WORDS
    return value in _OFF_OTHER  # by equality: 0.0 == 0 is off too


def bound_problem(name: str, value: float) -> str | None:
    """Why the number ``value`` is outside parameter ``name``'s bounds (``min``, ``above``, ``max``), or None."""
    p = PARAMETERS.get(name) or {}
    lo, above, hi = p.get("min"), p.get("above"), p.get("max")
    if lo is not None and value < lo:
        return f"must be at least {_num(lo)}"
    if (above is not None and not value > above) or (hi is not None and not value <= hi):
        words = (([f"above {_num(above)}"] if above is not None else [])
                 + ([f"at most {_num(hi)}"] if hi is not None else []))
        return "must be " + " and ".join(words)
    return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
