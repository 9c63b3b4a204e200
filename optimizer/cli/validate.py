"""``servetune validate STUDY``: check a study file as ``run`` would before its first launch."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from servetune.optimizer.cli.command import Command
from servetune.optimizer.cli.common import console, load, preflight


@dataclass
class ValidateCommand(Command):
    name = "validate"
    help = "check a study file"

    study: str
    no_path_check: bool = False

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study")
        parser.add_argument("--no-path-check", action="store_true",
                            help="do not look for model.path and the dataset file (check a GPU host's study elsewhere)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ValidateCommand:
        return cls(study=args.study, no_path_check=args.no_path_check)

    def run(self) -> int:
        check_paths = not self.no_path_check
        spec = load(self.study, check_paths)
        pf = preflight(spec, self.study, check_paths)
        for note in pf.notes:
            console.print(f"note: {note}", markup=False)
        space = pf.driver.space if pf.driver else None
        n = len(pf.configs) if pf.exact and pf.configs else None
        rejected = (f", {pf.n_rejected} of them rejected by the rules (servetune plan lists why)"
                    if n and pf.n_rejected else "")
        model = pf.driver.model.name if pf.driver else spec.model.path
        console.print(f"{self.study}: ok — study {spec.name!r}, model {model}, "
                      f"engines {', '.join(e.name for e in spec.engines)}, "
                      f"{len(space.dimensions) if space else len(spec.search)} parameters"
                      + (f" ({n} configurations{rejected})" if n else "") + f", {spec.budget.trials} trials",
                      markup=False)
        return 0
