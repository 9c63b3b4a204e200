"""``servetune report ...``: the three forms of the command, behind ``optimizer/cli/report.py``.

- ``servetune report RUN_DIR [-o OUT]``: the self-contained offline HTML (default ``RUN_DIR/report.html``)
- ``servetune report serve [DIR] [--host 127.0.0.1] [--port 8050]``: the local web app over every study in DIR
- ``servetune report compare RUN_A RUN_B [-o OUT]``: two studies on one chart (default next to the runs:
  ``compare-A-vs-B.html`` in their common parent directory)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from servetune.optimizer.run_dir import trials_root
from servetune.reports.compare import write_compare
from servetune.reports.html import write_report

USAGE = ("usage: servetune report RUN_DIR [-o OUT.html]\n"
         "       servetune report serve [DIR] [--host HOST] [--port PORT]\n"
         "       servetune report compare RUN_A RUN_B [-o OUT.html]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN_DIR | serve | compare", help="a run directory, or serve / compare")
    p.add_argument("more", nargs="*", metavar="DIR", help="serve: the folder of studies (default .); "
                                                          "compare: the two run directories")
    p.add_argument("-o", "--output", help="where to write the HTML (RUN_DIR/report.html; compare: "
                                          "compare-A-vs-B.html beside the runs)")
    p.add_argument("--host", default="127.0.0.1", help="serve: address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8050, help="serve: port (default 8050)")


def _not_run_dir(p: Path) -> str | None:
    if not trials_root(p).is_dir():
        return f"error: {p} is not a servetune run directory (no trials/ inside)"
    return None


def run(args: argparse.Namespace, out, err) -> int:
    """Dispatch; ``out``/``err`` print a line (rich consoles in the CLI). Returns the exit status."""
    target, more = args.target, list(args.more or [])
    if target == "serve" and not trials_root("serve").is_dir():
        if len(more) > 1:
            err(f"error: report serve takes one folder, got {len(more)}\n{USAGE}")
            return 2
        root = Path(more[0] if more else ".")
        if not root.is_dir():
            err(f"error: {root} is not a folder")
            return 2
        # aiohttp (through serve) would add ~0.2 s to every CLI command, which all load this module
        from servetune.reports.serve import serve  # noqa: PLC0415 — start-up, measured

        try:
            serve(root, host=args.host, port=args.port, print_fn=out)
        except OSError as e:  # the port is taken, the address is not ours
            err(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}")
            return 1
        return 0
    if target == "compare" and not trials_root("compare").is_dir():
        if len(more) != 2:
            err(f"error: report compare takes two run directories, got {len(more)}\n{USAGE}")
            return 2
        for d in more:
            msg = _not_run_dir(Path(d))
            if msg:
                err(msg)
                return 2
        path = write_compare(more[0], more[1], Path(args.output) if args.output else None)
        out(f"comparison: {path}")
        return 0
    if more:
        err(f"error: unexpected arguments after the run directory: {' '.join(more)}\n{USAGE}")
        return 2
    msg = _not_run_dir(Path(target))
    if msg:
        err(msg)
        return 2
    path = write_report(Path(target), Path(args.output) if args.output else None)
    out(f"report: {path}")
    return 0
