"""``servetune run STUDY``: run (or resume) a study, print each trial as it ends, then the Pareto front, the
best-vs-baseline lines and the report's path."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servetune.optimizer import interrupts, run_dir
from servetune.optimizer.cli.command import Command
from servetune.optimizer.cli.common import EXIT_USAGE, console, err_console, esc, fmt_params, load, preflight


@dataclass
class RunCommand(Command):
    name = "run"
    help = "run (or resume) a study"

    study: str
    output_dir: str | None = None
    trials: int | None = None
    ray_address: str | None = None
    no_report: bool = False
    new: bool = False

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study")
        parser.add_argument("--output-dir", help="override the study's output_dir")
        parser.add_argument("--trials", type=int, help="override budget.trials")
        parser.add_argument("--ray-address", help="join an existing Ray cluster (default: a local instance)")
        parser.add_argument("--no-report", action="store_true")
        parser.add_argument("--new", action="store_true",
                            help="start a fresh study (NAME-2, NAME-3, ...) instead of resuming the one in the run "
                                 "directory; needed when the study file changes what is measured or searched")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> RunCommand:
        return cls(study=args.study, output_dir=args.output_dir, trials=args.trials, ray_address=args.ray_address,
                   no_report=args.no_report, new=args.new)

    def run(self) -> int:
        # the driver brings Optuna, Ray's client and the engines: only `run` pays for them
        from servetune.optimizer import resume_check  # noqa: PLC0415 — CLI start-up time
        from servetune.optimizer.driver import StudyDriver, StudyLocked  # noqa: PLC0415 — CLI start-up time
        from servetune.optimizer.progress import RunProgress  # noqa: PLC0415 — CLI start-up time

        spec = load(self.study)
        preflight(spec, self.study)
        if self.output_dir:
            spec.output_dir = self.output_dir
        if self.trials:
            spec.budget.trials = self.trials
        changed = resume_check.compare(spec)
        if self.new and changed.stored:
            old_dir = spec.run_dir
            spec.name, spec.output_dir = resume_check.fresh_name(spec)
            console.print(f"a new study [bold]{spec.name}[/] in {spec.run_dir} ({old_dir} is kept as it is)")
        elif changed.refused:
            for line in changed.refusal(self.study):
                err_console.print(line, markup=False)
            return EXIT_USAGE
        elif changed.allowed:
            console.print("resuming with changes that keep the results comparable: " + "; ".join(changed.allowed),
                          markup=False)

        t0 = time.monotonic()
        objectives = spec.objective_keys()
        live = RunProgress(console, spec, fmt_params)

        def on_event(kind: str, data: dict[str, Any]) -> None:
            _print_event(spec.name, objectives, kind, data)
            live.event(kind, data)

        try:
            driver = StudyDriver(spec, on_event=on_event, ray_address=self.ray_address)
            try:
                with interrupts.catching():
                    outcome = driver.run()
            finally:
                live.stop()
        except StudyLocked as e:
            err_console.print(f"error: {e}", markup=False)
            return EXIT_USAGE
        except resume_check.StudyChanged as e:
            for line in e.lines:
                err_console.print(line, markup=False)
            return EXIT_USAGE
        except (ValueError, FileNotFoundError) as e:  # model/catalog problems found while preparing
            err_console.print(f"{self.study}:1: {e}", markup=False)
            return EXIT_USAGE
        except KeyboardInterrupt:
            err_console.print("interrupted: completed trials are saved; rerun the same command to continue")
            return 130
        console.print(f"done in {time.monotonic() - t0:.0f} s ({outcome.stopped_because})")
        if outcome.gpu_use:
            u = outcome.gpu_use
            console.print(f"GPU use: {u['utilization']:.0%} ({u['busy_gpu_s']:,.0f} of {u['available_gpu_s']:,.0f} "
                          "GPU-seconds held by trials)")
        print_pareto(outcome.run_dir, objectives)
        print_vs_baseline(outcome.run_dir)
        if not self.no_report:
            from servetune.reports.html import write_report  # noqa: PLC0415 — CLI start-up time (Plotly)

            path = write_report(outcome.run_dir)
            console.print(f"report: [bold]{path}[/]")
        return 0


def _print_event(study: str, objectives: list[tuple[str, str]], kind: str, data: dict[str, Any]) -> None:
    if kind == "start":
        console.print(f"[bold]servetune[/] study [bold]{study}[/]: {data['done']} of {data['budget']} trials "
                      f"done, results in {data['run_dir']}")
    elif kind == "resumed":
        console.print(f"[yellow]resumed: {data['requeued']} trial(s) interrupted earlier were queued again[/]")
    elif kind == "launch":
        tag = " [cyan](baseline)[/]" if data["baseline"] else ""
        verb = "queued" if data.get("queued") else "start "
        console.print(f"  #{data['number']:<3} {verb} {data['engine']} on {data['gpus']} GPU(s): "
                      f"{fmt_params(data['params'])}{tag}", markup=True)
    elif kind == "result":
        console.print("  " + result_line(data["result"], objectives), markup=True)
    elif kind == "interrupted":
        err_console.print("interrupted: stopping the running trials and their engines…")
    elif kind == "repeat":
        console.print(f"  #{data['number']:<3} repeat  (re-measuring a Pareto candidate)")
    elif kind == "note":
        console.print(f"  [dim]{esc(data['text'])}[/]", markup=True, highlight=False)


def result_line(r: Any, objectives: list[tuple[str, str]]) -> str:
    from servetune.optimizer.quality import describe  # noqa: PLC0415 — CLI start-up time

    head = f"#{r.number:<3} [bold]{r.state:<9}[/]"
    if r.duplicate_of is not None:
        head += f" (= #{r.duplicate_of})"
    if r.state != "complete":
        reason = (r.failure or {}).get("reason", "")
        kind = (r.failure or {}).get("kind", "")
        return f"{head} [red]{kind}[/]: {esc(reason)}"
    bits = []
    for label, sr in r.scenarios.items():
        s = sr.get("summary", {})
        sla = sr.get("sla_met")
        verdict = "" if sla is None else (" [green]SLA ok[/]" if sla else " [red]SLA missed[/]")
        if sr.get("contaminated"):
            verdict = " [yellow]contaminated (audit failed twice: no verdict)[/]"
        bits.append(f"{label}: {s.get('output_tokens_per_s', 0):,.0f} tok/s "
                    f"({s.get('output_tokens_per_s_per_gpu', 0):,.0f}/GPU), "
                    f"p99 TTFT {s.get('ttft_p99_ms', float('nan')):.0f} ms, "
                    f"p99 TPOT {s.get('tpot_p99_ms', float('nan')):.1f} ms{verdict}")
    if r.quality and r.quality.get("kind"):
        color = {True: "green", False: "red"}.get(r.quality.get("passed"), "dim")
        bits.append(f"[{color}]{esc(describe(r.quality))}[/]")
    return f"{head} {'; '.join(bits)}  [dim]{r.wall_s:.0f} s[/]"


def print_vs_baseline(path: Path) -> None:
    """summary.json's best-vs-baseline lines: a ratio only when both sides met the SLA, else why not."""
    for e in (run_dir.read_summary(path) or {}).get("vs_baseline") or []:
        console.print(("[bold]" if e.get("ratio") is not None else "[yellow]") + esc(e["text"]) + "[/]")


def print_pareto(path: Path, objectives: list[tuple[str, str]]) -> None:
    from rich.table import Table  # noqa: PLC0415 — CLI start-up time

    from servetune.reports.model import load_run  # noqa: PLC0415 — CLI start-up time (pandas)
    from servetune.reports.pareto import feasible, sla_front  # noqa: PLC0415 — CLI start-up time

    run = load_run(path)
    if run.trials.empty:
        console.print("no trials")
        return
    cols = [f"{s}.{m}" for s, m in objectives]
    directions = [o.get("direction", "maximize") for o in run.spec.get("objectives", [])]
    ok = feasible(run.trials, run.quality_ok())
    limits = f"{run.quality_kind} limits" if run.quality_kind else ""
    if ok.empty:
        console.print("[yellow]no trial met every SLA" + (f" and the {limits}" if limits else "") + "[/]")
        return
    front, also = sla_front(ok, cols, directions)
    table = Table(title="Pareto-optimal trials (SLA met" + (f", {limits} met)" if limits else ")"))
    table.add_column("#", justify="right")
    table.add_column("config")
    for c in cols:
        table.add_column(c, justify="right")
    for _, row in front.iterrows():
        params = {k.removeprefix("param."): row[k] for k in row.index if k.startswith("param.") and row[k] == row[k]}
        mark = " (baseline)" if row.get("is_baseline") else ""
        if also.get(int(row["number"])):
            mark += " (also #" + ", #".join(map(str, also[int(row["number"])])) + ")"
        table.add_row(str(int(row["number"])), esc(fmt_params(params)) + mark, *[f"{row[c]:,.1f}" for c in cols])
    console.print(table)
