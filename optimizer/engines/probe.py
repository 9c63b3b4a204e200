"""The engine's side of a level's audit (loadgen.audit.EngineProbe): its /metrics as engine-neutral
counters, its KV-cache gauge, and the disturbance lines its log gained between two offsets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from servetune.optimizer.engines import disturbances as D
from servetune.optimizer.engines.base import Engine
from servetune.optimizer.engines.prometheus import gauge_max
from servetune.optimizer.engines.registry import engine_class, get_engine, names
from servetune.optimizer.process import http_get


class EngineProbe:
    def __init__(self, engine: Engine, metrics_url: str, log_path: str | Path | None = None) -> None:
        self.engine, self.metrics_url = engine, metrics_url
        self.log_path = Path(log_path) if log_path is not None else None
        self.has_log = self.log_path is not None

    def counters(self) -> dict[str, float] | None:
        text = http_get(self.metrics_url)
        if text is None:
            return None
        out = self.engine.audit_counters(self.engine.parse_metrics(text))
        kv = self._kv(text)
        if kv is not None:
            out["kv_cache_usage"] = kv  # the fullest engine's, not the sum over data-parallel engines
        return out

    def kv_usage(self) -> float | None:
        text = http_get(self.metrics_url)
        return self._kv(text) if text is not None else None

    def _kv(self, text: str) -> float | None:
        name = self.engine.kv_usage_metric
        return gauge_max(text, name) if name else None

    def log_offset(self) -> int | None:
        if self.log_path is None:
            return None
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return None

    def log_events(self, start: int, end: int) -> list[dict[str, Any]]:
        if self.log_path is None:
            return []
        return D.scan(D.read_window(self.log_path, start, end), self.engine.disturbances)


def probe_for_server(metrics_url: str) -> tuple[EngineProbe | None, str]:
    """A probe for a server someone else started (``servetune bench``): the engine is told by the names its
    /metrics exposes. (None, why) when it exposes none servetune reads."""
    text = http_get(metrics_url)
    if text is None:
        return None, f"{metrics_url} did not answer: no audit"
    real = [engine_class(n) for n in names() if not engine_class(n).simulated and engine_class(n).metrics_prefix]
    for cls in real:
        if f"\n{cls.metrics_prefix}" in f"\n{text}":
            return EngineProbe(get_engine(cls.name), metrics_url), f"{cls.name} metrics at {metrics_url}"
    known = " nor ".join(f"{c.label()}'s" for c in real)
    return None, f"{metrics_url} exposes neither {known} metrics: no audit"
