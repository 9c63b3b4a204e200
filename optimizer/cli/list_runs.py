"""``servetune list [DIR]``: the studies under a directory (default ``runs/``), one line each: status, trials,
best result, last change. Reads the run directories only (trial records, study.yaml, sessions.json)."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from servetune.optimizer import run_dir as rd
from servetune.optimizer.cli.command import Command
from servetune.optimizer.cli.common import console, err_console
from servetune.reports.model import load_run


def find_runs(root: Path) -> list[Path]:
    """Run directories at or under ``root`` (a directory holding trials/ or study.yaml), two levels deep."""
    root = Path(root)
    if rd.is_run_dir(root):
        return [root]
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if rd.is_run_dir(d):
            out.append(d)
        else:
            out += [e for e in sorted(d.iterdir()) if e.is_dir() and (e / rd.TRIALS).is_dir()]
    return out


def describe(run_dir: Path) -> dict[str, Any]:
    run = load_run(run_dir)
    states = run.state_counts()
    budget = (run.spec.get("budget") or {}).get("trials") if isinstance(run.spec.get("budget"), dict) else None
    stopped = (rd.read_summary(run_dir) or {}).get("stopped_because")
    sessions = rd.read_sessions(run_dir)
    try:  # a summary older than the last run's start is an earlier run's: the last one did not finish
        last_start = datetime.fromisoformat(str(sessions[-1]["started"])).timestamp() if sessions else 0.0
    except (KeyError, ValueError):
        last_start = 0.0
    if rd.study_running(run_dir):
        status = "running"
    elif stopped is None or rd.summary_path(run_dir).stat().st_mtime < last_start:
        status = "interrupted"
    else:
        status = f"done ({stopped})"
    best = ""
    if run.objectives and not run.trials.empty:
        o = run.objectives[0]
        ok = run.sla_met_all([s.name for s in run.scenarios]) if run.scenarios else run.complete
        if o.column in run.trials:
            vals = run.trials.loc[ok, o.column].astype(float)
            vals = vals[vals.map(math.isfinite)]
            if not vals.empty:
                idx = vals.idxmax() if o.direction == "maximize" else vals.idxmin()
                best = f"{o.column} {vals[idx]:,.4g} (#{int(run.trials.at[idx, 'number'])})"
    newest = rd.newest_record_mtime(run_dir)
    done = sum(v for k, v in states.items() if k in ("complete", "failed"))
    return {"study": run.spec.get("name") or run_dir.name, "path": str(run_dir), "status": status,
            "trials": f"{done}{'/' + str(budget) if budget else ''}"
                      + "".join(f", {v} {k}" for k, v in states.items() if v and k not in ("complete",)),
            "best": best or "—", "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(newest)) if newest else ""}


@dataclass
class ListCommand(Command):
    name = "list"
    help = "the studies under a directory: status, trials, best result"
    description = ("List the run directories under DIR (default runs/) with their status (running, done, "
                   "interrupted), trials measured of the budget, and the best value of the first objective among "
                   "trials that met the SLA.")

    dir: str = "runs"

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("dir", nargs="?", default="runs")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ListCommand:
        return cls(dir=args.dir)

    def run(self) -> int:
        return list_runs(Path(self.dir))


def list_runs(root: Path) -> int:
    if not root.exists():
        err_console.print(f"{root}: no such directory (studies are written to runs/NAME by default)", markup=False)
        return 2
    runs = find_runs(root)
    if not runs:
        console.print(f"{root}: no studies", markup=False)
        return 0
    rows = [("STUDY", "STATUS", "TRIALS", "BEST (first objective, SLA met)", "UPDATED", "PATH")]
    for d in runs:
        try:
            info = describe(d)
            rows.append((info["study"], info["status"], info["trials"], info["best"], info["updated"], info["path"]))
        except Exception as e:  # one unreadable run never hides the others
            rows.append((d.name, f"unreadable ({type(e).__name__})", "", "", "", str(d)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:  # one line per study, never wrapped: it greps and pipes well
        console.print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), markup=False, highlight=False,
                      soft_wrap=True)
    return 0
