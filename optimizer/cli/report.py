"""``servetune report``: the HTML report of a run directory, ``serve`` a local report app, ``compare`` two
studies (the forms live in :mod:`servetune.reports.command`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from servetune.optimizer.cli.command import Command
from servetune.optimizer.cli.common import console, err_console
from servetune.reports.command import USAGE, add_arguments
from servetune.reports.command import run as report_command


@dataclass
class ReportCommand(Command):
    name = "report"
    help = "the HTML report of a run directory; 'serve' a local report app; 'compare' two studies"
    usage = USAGE.removeprefix("usage: ")

    target: str
    more: list[str] = field(default_factory=list)
    output: str | None = None
    host: str = "127.0.0.1"
    port: int = 8050

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ReportCommand:
        return cls(target=args.target, more=list(args.more or []), output=args.output, host=args.host, port=args.port)

    def run(self) -> int:
        args = argparse.Namespace(target=self.target, more=self.more, output=self.output, host=self.host,
                                  port=self.port)
        return report_command(args, lambda m: console.print(m, markup=False),
                              lambda m: err_console.print(m, markup=False))
