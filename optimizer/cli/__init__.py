"""``servetune`` command line: one module per command, each a :class:`~servetune.optimizer.cli.command.Command`.

A bad study file prints ``FILE:LINE: key: message`` lines and exits 2; no command shows a traceback for
user error.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from servetune.optimizer.cli.bench import BenchCommand
from servetune.optimizer.cli.command import Command, register
from servetune.optimizer.cli.common import console, err_console
from servetune.optimizer.cli.export import ExportCommand
from servetune.optimizer.cli.list_runs import ListCommand
from servetune.optimizer.cli.plan import PlanCommand
from servetune.optimizer.cli.rayjob import RayJobCommand
from servetune.optimizer.cli.report import ReportCommand
from servetune.optimizer.cli.run import RunCommand
from servetune.optimizer.cli.validate import ValidateCommand

__all__ = ["COMMANDS", "build_parser", "console", "err_console", "main"]

# in the order `servetune --help` lists them
COMMANDS: tuple[type[Command], ...] = (RunCommand, ValidateCommand, ReportCommand, ExportCommand, BenchCommand,
                                       PlanCommand, ListCommand, RayJobCommand)


def _version() -> str:
    try:
        return version("servetune")
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="servetune", description="Find the inference-server configuration that serves "
                                "your model, on your GPUs, for your workload, best.")
    p.add_argument("--version", action="version", version=f"servetune {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        register(sub, cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # --version, --help and usage errors end here
        return int(args.func(args) or 0)
    except SystemExit as e:
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
