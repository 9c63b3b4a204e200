"""``servetune plan STUDY``: what a run would do, before it does it (built by :mod:`servetune.optimizer.plan`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from servetune.optimizer.cli.command import Command
from servetune.optimizer.cli.common import console, load, preflight
from servetune.optimizer.plan import ESTIMATES, lines, make_plan


@dataclass
class PlanCommand(Command):
    name = "plan"
    help = "what a run would do: space, rules, baseline argv, estimate, wall time"
    description = ("Print the size of the search space, the configurations the pre-launch rules reject (reasons "
                   "grouped), each engine's baseline argv, the estimator's range for the objectives and the "
                   "expected wall time. Launches nothing, writes nothing.")

    study: str
    no_path_check: bool = False
    estimates: int = ESTIMATES

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study")
        parser.add_argument("--no-path-check", action="store_true",
                            help="do not look for model.path and the dataset file (plan a GPU host's study elsewhere)")
        parser.add_argument("--estimates", type=int, default=ESTIMATES, metavar="N",
                            help=f"configurations the estimator scores (default {ESTIMATES}; 0: none)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> PlanCommand:
        return cls(study=args.study, no_path_check=args.no_path_check, estimates=args.estimates)

    def run(self) -> int:
        check_paths = not self.no_path_check
        spec = load(self.study, check_paths)
        pf = preflight(spec, self.study, check_paths)
        if pf.driver is None:
            for note in pf.notes:
                console.print(f"note: {note}", markup=False)
            console.print("plan: the model's shape is unknown here, so there is nothing to plan; give model.preset "
                          "beside model.path", markup=False)
            return 2
        for line in lines(spec, make_plan(spec, pf, estimates=max(self.estimates, 0))):
            console.print(line, markup=False)
        return 0
