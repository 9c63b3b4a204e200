"""Minimal Prometheus text-format reader: enough for engine /metrics scraping (gauges, counters, histograms),
and the arithmetic of two scrapes that every engine's summary of a measured window uses."""
from __future__ import annotations

import math
import re

_LABEL = re.compile(r'(\w+)="((?:\\.|[^"\\])*)"')


def labelled_key(name: str, label: str, value: str) -> str:
    """The key :func:`parse_prometheus` gives one label value's series of a split metric."""
    return f'{name}{{{label}="{value}"}}'


def parse_prometheus(text: str, split: dict[str, str] | None = None) -> dict[str, float]:
    """Sum every sample of a metric name over its labels. ``_bucket`` series are skipped (keep _sum/_count).

    ``split`` {metric name: label} also keeps that metric per value of that label (summed over the other
    labels), under :func:`labelled_key` keys: e.g. vLLM's accepted tokens per draft position."""
    out: dict[str, float] = {}
    split = split or {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labels = ""
        if "{" in line:
            name, _, rest = line.partition("{")
            labels, _, rest = rest.rpartition("}")
        else:
            name, _, rest = line.partition(" ")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        if name.endswith("_bucket") or math.isnan(value):
            continue
        out[name] = out.get(name, 0.0) + value
        label = split.get(name)
        if label and labels:
            for k, v in _LABEL.findall(labels):
                if k == label:
                    key = labelled_key(name, label, v)
                    out[key] = out.get(key, 0.0) + value
    return out


def gauge_max(text: str, name: str) -> float | None:
    """The largest sample of one metric over its labelled series (a gauge per data-parallel engine or rank,
    where :func:`parse_prometheus`'s sum would exceed 1 for a usage fraction). None when absent."""
    best = None
    start = 0
    while True:
        i = text.find(name, start)
        if i < 0:
            return best
        start = i + len(name)
        if i and text[i - 1] != "\n":
            continue  # a longer name that ends with this one, or a comment line
        rest = text[start:text.find("\n", start) if text.find("\n", start) >= 0 else len(text)]
        if rest[:1] not in ("{", " "):
            continue  # a longer name that starts with this one
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1:]
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if not math.isnan(value):
            best = value if best is None else max(best, value)


def counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """How far a counter moved between two scrapes; None when the second does not have it."""
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None where either is unknown or den is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def finite_rounded(d: dict[str, float | None]) -> dict[str, float]:
    """The known, finite values of a summary, rounded to 6 decimals."""
    return {k: round(float(v), 6) for k, v in d.items() if v is not None and math.isfinite(float(v))}
