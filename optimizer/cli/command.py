"""One pattern for every ``servetune`` command: a dataclass with its options, built from the parsed command
line, and a ``run`` that returns the exit status (the shape of vLLM's ``benchmarks/sweep`` commands)."""
from __future__ import annotations

import abc
import argparse
from typing import Any, ClassVar


class Command(abc.ABC):
    name: ClassVar[str]
    help: ClassVar[str]
    description: ClassVar[str | None] = None
    usage: ClassVar[str | None] = None

    @classmethod
    @abc.abstractmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Its options, on its own sub-command parser."""

    @classmethod
    @abc.abstractmethod
    def from_cli_args(cls, args: argparse.Namespace) -> Command:
        """The command, from the parsed options."""

    @abc.abstractmethod
    def run(self) -> int:
        """Do it; the exit status."""


def register(subparsers: Any, cmd: type[Command]) -> argparse.ArgumentParser:
    """Add ``cmd`` to the ``servetune`` sub-command parser; ``args.func(args)`` runs it."""
    kw = {k: v for k, v in (("description", cmd.description), ("usage", cmd.usage)) if v is not None}
    p = subparsers.add_parser(cmd.name, help=cmd.help, **kw)
    cmd.add_cli_args(p)
    p.set_defaults(func=lambda args: cmd.from_cli_args(args).run(), command_class=cmd)
    return p


def run_alone(cmd: type[Command], argv: list[str]) -> int:
    """``python -m servetune.optimizer.cli.<command> ...``: the same as ``servetune <command> ...``."""
    parser = argparse.ArgumentParser(prog="servetune")
    register(parser.add_subparsers(dest="command", required=True), cmd)
    if argv[:1] != [cmd.name]:
        argv = [cmd.name, *argv]
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
