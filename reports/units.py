"""Human names, units and precision for the unit-carrying metric names (``tpot_p99_ms`` → "p99 TPOT", ms)."""
from __future__ import annotations

import json
import math
import re
from typing import Any

# Names whose suffix alone would read badly; everything else is derived from the name's pattern.
_KNOWN: dict[str, tuple[str, str]] = {
    "output_tokens_per_s": ("output tokens/s", "tok/s"),
    "output_tokens_per_s_per_gpu": ("output tokens/s/GPU", "tok/s/GPU"),
    "tokens_per_s_per_gpu": ("tokens/s/GPU", "tok/s/GPU"),
    "tokens_per_s_per_user": ("tokens/s/user", "tok/s"),
    "input_tokens_per_s": ("input tokens/s", "tok/s"),
    "total_tokens_per_s": ("total tokens/s", "tok/s"),
    "request_per_s": ("requests/s", "req/s"),
    "requests_per_s": ("requests/s", "req/s"),
    "goodput_request_per_s": ("goodput", "req/s"),
    "error_rate": ("error rate", "%"),
    "requests_ok": ("requests ok", ""),
    "requests_failed": ("requests failed", ""),
    "duration_s": ("duration", "s"),
    "wall_s": ("wall time", "s"),
    "ready_s": ("time to ready", "s"),
    "gpus": ("GPUs", ""),
}
_ACRONYMS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E", "e2el": "E2E"}
_PCTL = re.compile(r"^(?P<what>[a-z0-9_]+?)_(?P<stat>p\d+(?:\.\d+)?|mean|median|max|min|std)_(?P<unit>ms|s)$")


def metric_label(name: str) -> str:
    if name in _KNOWN:
        return _KNOWN[name][0]
    m = _PCTL.match(name)
    if m:
        what = _ACRONYMS.get(m["what"], m["what"].replace("_", " "))
        return f"{m['stat']} {what}"
    return name.removesuffix("_ms").removesuffix("_s").replace("_per_", "/").replace("_", " ")


def metric_unit(name: str) -> str:
    if name in _KNOWN:
        return _KNOWN[name][1]
    if name.endswith("_ms"):
        return "ms"
    if name.endswith("_per_s"):
        return "/s"
    if name.endswith("_s"):
        return "s"
    return ""


# Units a label already spells out ("output tokens/s/GPU"): repeating them in a title is noise.
_SELF_EVIDENT = {"tok/s", "tok/s/GPU", "req/s", "/s", ""}


def axis_title(name: str) -> str:
    unit = metric_unit(name)
    return metric_label(name) if unit in _SELF_EVIDENT else f"{metric_label(name)} ({unit})"


def fmt_number(v: Any) -> str:
    """Enough digits to compare trials, no more: 1,015 · 380 · 24.3 · 0.85."""
    if v is None or isinstance(v, bool):
        return "—" if v is None else str(v).lower()
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.01:
        return f"{x:.2f}"
    return f"{x:.2g}"


def fmt_metric(v: Any, name: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    unit = metric_unit(name)
    if unit == "%":
        try:
            return f"{float(v) * 100:.1f}%" if float(v) else "0%"
        except (TypeError, ValueError):
            return str(v)
    text = fmt_number(v)
    return f"{text} {unit}" if unit else text


def fmt_param(v: Any) -> str:
    """A parameter as the user wrote it (8192, not 8,192: it is a flag value, not a measurement)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)
