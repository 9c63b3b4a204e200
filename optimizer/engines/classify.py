"""Failure classification shared by engines whose logs look like vLLM's (vLLM itself and the sim).

Each rule is (kind, regex, one-line reason). The first rule that matches the log tail wins; the matched
line is quoted in the reason so a user sees the engine's own words.
"""
from __future__ import annotations

import re

from servetune.optimizer.engines.base import Failure, FailureKind

Rule = tuple[FailureKind, str, str]

VLLM_RULES: list[Rule] = [
    (FailureKind.OOM, r"CUDA out of memory|OutOfMemoryError",
     "GPU out of memory: lower memory_fraction, max_concurrency or use more GPUs / fp8"),
    (FailureKind.OOM, r"No available memory for the cache blocks",
     "weights leave no room for the KV cache: raise memory_fraction, quantize, or shard wider"),
    (FailureKind.OOM, r"To serve at least one request with the model's max seq len",
     "KV cache cannot hold one max-length sequence: lower max_model_len or free memory"),
    (FailureKind.OOM, r"Free memory on device .* is less than desired GPU memory utilization",
     "GPU memory is not free (another process?) or memory_fraction too high"),
    (FailureKind.BAD_ARGS, r"error: (unrecognized arguments|argument .*invalid|ambiguous option)",
     "the engine refused its flags"),
    (FailureKind.BAD_ARGS, r"ValidationError|Value error,", "the engine's config validation refused this combination"),
    (FailureKind.UNSUPPORTED,
     r"NotImplementedError|is not supported|not valid for this configuration|No valid attention backend",
     "this combination is not supported by the engine"),
    (FailureKind.BAD_ARGS, r"ValueError", "the engine rejected a value"),
]


def classify_with(rules: list[Rule], log_tail: str, exit_code: int | None) -> Failure:
    lines = log_tail.splitlines()
    for kind, pattern, reason in rules:
        rx = re.compile(pattern)
        for line in reversed(lines):
            if rx.search(line):
                return Failure(kind, f"{reason} [{_quote(line)}]")
    if exit_code == 2:
        return Failure(FailureKind.BAD_ARGS, "exit code 2 (argument error): " + _last_error(lines))
    if exit_code is not None and exit_code < 0:
        return Failure(FailureKind.CRASH, f"killed by signal {-exit_code}: " + _last_error(lines))
    return Failure(FailureKind.CRASH, f"exited with code {exit_code}: " + _last_error(lines))


def classify_vllm_like(log_tail: str, exit_code: int | None) -> Failure:
    return classify_with(VLLM_RULES, log_tail, exit_code)


def _quote(line: str, limit: int = 200) -> str:
    line = line.strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _last_error(lines: list[str]) -> str:
    for line in reversed(lines):
        if re.search(r"error|exception|fatal|traceback", line, re.I):
            return _quote(line)
    for line in reversed(lines):
        if line.strip():
            return _quote(line)
    return "no output"
