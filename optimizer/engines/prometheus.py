"""Minimal Prometheus text-format reader: enough for engine /metrics scraping (gauges, counters, histograms)."""
from __future__ import annotations

import math


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of a metric name over its labels. ``_bucket`` series are skipped (keep _sum/_count)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            _, _, rest = rest.rpartition("}")
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
    return out
