"""The ``search:`` section: each parameter's domain checked against its type and bounds
(search_spaces/parameters.yaml), ``requires:`` parents searched and on, and the smallest trial fitting the GPUs."""
from __future__ import annotations

import math
from typing import Any, Union

from pydantic import Field, ValidationError, model_validator

from servetune.optimizer.parameters import PARAMETERS, bound_problem, is_off
from servetune.optimizer.spec_base import MAX_PARAM_INT, StrictModel
from servetune.optimizer.spec_errors import (
    close_match,
    describe,
    did_you_mean,
    did_you_mean_or_list,
    fail,
    message,
    num,
)
from servetune.optimizer.spec_serving import HardwareSpec

_GPU_PARAMS = ("tensor_parallel", "pipeline_parallel", "data_parallel")
_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


Domain = Union[list[Any], dict[str, Any], int, float, str, bool, None]


class RangeDomain(StrictModel):
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> "RangeDomain":
        if self.low > self.high:
            fail("range", [((), f"low ({num(self.low)}) is above high ({num(self.high)})")])
        if self.log and self.low <= 0:
            fail("range", [(("low",), f"a log domain needs low > 0 (got {num(self.low)})")])
        if self.log and self.step is not None:
            fail("range", [(("step",), "step and log: true cannot be combined; drop one")])
        return self


# -- search domains ----------------------------------------------------------------------------------------

def _values(dom: Any) -> list[Any]:
    if isinstance(dom, list):
        return dom
    if isinstance(dom, dict):
        return [dom.get("low"), dom.get("high")]
    return [dom]


def _check_value(key: str, x: Any, ptype: str | None) -> str | None:
    """Why ``x`` is not a value of parameter ``key`` (of ``ptype``), or None."""
    if x is None:
        return None  # leave the engine's default
    if ptype == "int":
        if isinstance(x, bool) or not isinstance(x, int):
            return f"{key} takes whole numbers, got {describe(x)}"
    elif ptype == "float":
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return f"{key} takes numbers, got {describe(x)}"
    elif ptype == "bool":
        if not isinstance(x, bool) and not (isinstance(x, str) and x.lower() in _BOOL_WORDS):
            return f"{key} is true or false, got {describe(x)}"
        return None
    elif ptype == "str":
        if x is False:
            return None  # YAML reads `off` / `no` as false; it means "none"
        if not isinstance(x, str):
            return f"{key} takes names, got {describe(x)}; quote it if you mean the text"
        return None
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return f"{key} takes finite numbers, got {describe(x)}"
    if abs(x) > MAX_PARAM_INT:
        return f"{key} must be at most {MAX_PARAM_INT:,} (engines read it as a 32-bit number), got {describe(x)}"
    why = bound_problem(key, x)
    return f"{key} {why}, got {describe(x)}" if why else None


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
                errs.append(((key, i), f"a value of {key} cannot be {describe(x)}"))
                continue
            why = _check_value(key, x, ptype)
            if why:
                errs.append(((key, i), why))
            elif any(type(x) is type(y) and x == y for y in seen):
                errs.append(((key, i), f"{describe(x)} is listed twice"))
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
            typos = {close_match(err["loc"][-1], RangeDomain.model_fields) for err in e.errors()
                     if err["type"] == "extra_forbidden"}
            for err in e.errors():
                if err["type"] == "missing" and err["loc"][-1] in typos:
                    continue  # reported as the unknown key's "did you mean"
                loc = (key, *err["loc"])
                if err["type"] == "extra_forbidden":
                    out.append((loc, f"unknown key {err['loc'][-1]!r}"
                                     f"{did_you_mean_or_list(err['loc'][-1], RangeDomain.model_fields)}"))
                elif err["type"] == "missing":
                    out.append((loc, f"a range needs low and high ({err['loc'][-1]} is missing)"))
                else:
                    out.append((loc, message(err, RangeDomain)))
            return out
        errs = []
        if ptype == "int":
            for k in ("low", "high", "step"):
                x = dom.get(k)
                if x is not None and not (isinstance(x, int) and not isinstance(x, bool)):
                    errs.append(((key, k), f"{key} takes whole numbers, so {k} must be one (got {describe(x)})"))
        for k in ("low", "high"):
            why = _check_value(key, dom[k], "float")
            if why and not any(e[0] == (key, k) for e in errs):
                errs.append(((key, k), why))
        if not errs and r.step is not None and r.step > r.high - r.low and r.high > r.low:
            errs.append(((key, "step"), f"step ({num(r.step)}) is larger than the range {num(r.low)}..{num(r.high)}"))
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


def search_errors(search: dict[str, Any], hardware: Any) -> list[tuple[tuple, str]]:
    """Located problems of a study's ``search:`` mapping (locations relative to it); ``hardware`` is the
    study's :class:`HardwareSpec` when that validated (the GPU check waits for one otherwise)."""
    errs: list[tuple[tuple, str]] = []
    for key, dom in search.items():
        if key not in PARAMETERS:
            errs.append(((key,), f"unknown parameter {key!r}{did_you_mean(key, PARAMETERS)}"))
            continue
        errs += _check_domain(key, dom, PARAMETERS[key].get("type"))
    for key in search:
        parent = PARAMETERS[key].get("requires") if key in PARAMETERS else None
        if not parent:
            continue
        if parent not in search:
            errs.append(((key,), f"{key} is only used when {parent} is on, and {parent} is not searched; "
                                 f"add {parent} to search (e.g. {parent}: [none, ...])"))
        elif all(is_off(x) for x in _values(search[parent])):
            errs.append(((key,), f"{key} is only used when {parent} is on, and every value of "
                                 f"search.{parent} is off"))
    if not errs and isinstance(hardware, HardwareSpec):
        errs += _gpu_errors(search, hardware)
    return errs
