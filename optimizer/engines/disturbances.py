"""Engine-log lines that say a measured level was disturbed, and how to find those a window wrote.

An engine adapter lists its signatures (``Engine.disturbances``): a kind, a regex, and whether a line of
that kind inside a measured window invalidates the level. Kinds:

- ``jit``: a kernel compiled during inference (vLLM's jit_monitor warning), a latency spike of warm-up;
- ``compile``: a recompile or a JIT-built library op (torch.compile's recompile limit, FlashInfer's JIT);
- ``cuda_graph``: a batch that missed the captured CUDA graphs (no engine logs this per step today);
- ``preemption``: requests preempted or retracted for lack of KV cache (the counters count them too);
- ``oom_retry``: an out-of-memory the engine survived by retracting work.

Only the first two invalidate a level: they are the engine warming up, not the configuration. The others
are how a configuration behaves under the level's load, recorded beside it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from servetune.loadgen.audit import clip

MAX_WINDOW_BYTES = 64 * 1024 * 1024  # a window's log beyond this is read from its end (a runaway log)
# A line as recorded: vLLM's --jit-monitor-verbose line is ~3 KB (constexprs, signature, compile info, key) and
# a level keeps up to 20; its first 400 characters hold the kernel's name and the constexprs that tell shapes apart.
MAX_LINE_CHARS = 400


@dataclass(frozen=True)
class Signature:
    kind: str
    pattern: re.Pattern[str]
    invalidates: bool


def sig(kind: str, pattern: str, invalidates: bool) -> Signature:
    return Signature(kind, re.compile(pattern), invalidates)


# Shared by every engine built on torch and FlashInfer.
TORCH_RECOMPILE = sig("compile", r"torch\._dynamo hit config\.(?:recompile_limit|cache_size_limit)|"
                                 r"Recompiling function", True)
FLASHINFER_JIT = sig("compile", r"flashinfer\.jit: Loading JIT ops", True)
# Triton's autotuner benchmarking configs for a new key (printed when TRITON_PRINT_AUTOTUNING is on, which
# vLLM's jit_monitor turns on after warm-up): "Triton autotuning for function fused_moe_kernel, with key as
# (...), finished after 2.31s, best config selected: ...".
TRITON_AUTOTUNE = sig("jit", r"Triton autotuning for function", True)


def read_window(path: str | Path, start: int, end: int) -> str:
    """The log text between two byte offsets (the end of it when the window wrote more than
    MAX_WINDOW_BYTES); empty when the file cannot be read."""
    if end <= start:
        return ""
    start = max(start, end - MAX_WINDOW_BYTES)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start).decode("utf-8", "replace")
    except OSError:
        return ""


def scan(text: str, signatures: Iterable[Signature]) -> list[dict[str, Any]]:
    """Every line of ``text`` that matches a signature (the first that matches names its kind)."""
    sigs = list(signatures)
    out = []
    for line in text.splitlines():
        for s in sigs:
            if s.pattern.search(line):
                out.append({"kind": s.kind, "line": clip(line, MAX_LINE_CHARS), "invalidates": s.invalidates})
                break
    return out
