"""Engines servetune can launch: one adapter module each, registered by name (``registry``)."""
from __future__ import annotations

from servetune.optimizer.engines.registry import engine_class, get_engine, names, simulated

__all__ = ["engine_class", "get_engine", "names", "simulated"]
