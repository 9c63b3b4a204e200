"""Engines servetune can launch. ``get_engine`` is the only way the rest of the code gets one."""
from __future__ import annotations

from servetune.optimizer.engines.base import Engine


def get_engine(name: str, command: list[str] | None = None, version: str | None = None) -> Engine:
    if name == "sim":
        from servetune.optimizer.engines.sim.engine import SimEngine

        return SimEngine(command, version)
    if name == "vllm":
        from servetune.optimizer.engines.vllm import VllmEngine

        return VllmEngine(command, version)
    if name == "sglang":
        from servetune.optimizer.engines.sglang import SglangEngine

        return SglangEngine(command, version)
    raise ValueError(f"unknown engine {name!r} (have: sim, vllm, sglang)")
