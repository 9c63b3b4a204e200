"""What the commands share: the consoles, loading a study (errors as ``FILE:LINE: key: message``, exit 2) and
how a configuration is printed."""
from __future__ import annotations

from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

EXIT_USAGE = 2

# Not a terminal (CI, a pipe): lines are kept whole instead of wrapped at 80 columns.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

_SHORT = {"tensor_parallel": "tp", "pipeline_parallel": "pp", "data_parallel": "dp", "max_concurrency": "conc",
          "max_batched_tokens": "mbt", "quantization": "quant", "kv_cache_dtype": "kv", "memory_fraction": "mem",
          "chunked_prefill": "chunk", "prefix_caching": "pfx", "speculative_method": "spec",
          "speculative_tokens": "k", "speculative_lookup_min": "lookup_min", "speculative_lookup_max": "lookup_max"}


def fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        if isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{_SHORT.get(k, k)}={v}")
    return " ".join(parts) or "(engine defaults)"


def esc(s: str) -> str:
    return escape(s)


def usage_error(lines: list[str]) -> NoReturn:
    for line in lines:
        err_console.print(line, markup=False)
    raise SystemExit(EXIT_USAGE)


def load(path: str, check_paths: bool = True) -> Any:
    # spec (pydantic, the catalogs) loads only for commands that read a study: `servetune --help` stays quick
    from servetune.optimizer.spec import SpecError, load_study  # noqa: PLC0415 — CLI start-up time

    try:
        return load_study(path, check_paths=check_paths)
    except SpecError as e:
        usage_error(e.lines)


def preflight(spec: Any, path: str, check_paths: bool = True) -> Any:
    """The checks run makes before its first launch; their errors end the command (exit 2)."""
    from servetune.optimizer import preflight as pf_module  # noqa: PLC0415 — CLI start-up time (Optuna, engines)

    pf = pf_module.check(spec, path, check_paths=check_paths)
    if pf.errors:
        usage_error(pf.errors)
    return pf

