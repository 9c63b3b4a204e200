"""``servetune`` command line: run, validate, report, export, bench, rayjob.

A bad study file prints ``FILE:LINE: key: message`` lines and exits 2; no command shows a traceback for
user error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

EXIT_USAGE = 2

# Not a terminal (CI, a pipe): lines are kept whole instead of wrapped at 80 columns.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

_SHORT = {"tensor_parallel": "tp", "pipeline_parallel": "pp", "data_parallel": "dp", "max_concurrency": "conc",
          "max_batched_tokens": "mbt", "quantization": "quant", "kv_cache_dtype": "kv", "memory_fraction": "mem",
          "chunked_prefill": "chunk", "prefix_caching": "pfx", "speculative_method": "spec",
          "speculative_tokens": "k", "speculative_lookup_min": "lookup_min", "speculative_lookup_max": "lookup_max"}


def _fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        if isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{_SHORT.get(k, k)}={v}")
    return " ".join(parts) or "(engine defaults)"


def _load(path: str, check_paths: bool = True):
    from servetune.optimizer.spec import SpecError, load_study

    try:
        return load_study(path, check_paths=check_paths)
    except SpecError as e:
        for line in e.lines:
            err_console.print(line, markup=False)
        raise SystemExit(EXIT_USAGE) from None


def _preflight(spec, path: str, check_paths: bool = True):
    """The checks run makes before its first launch; their errors end the command (exit 2)."""
    from servetune.optimizer import preflight

    pf = preflight.check(spec, path, check_paths=check_paths)
    if pf.errors:
        for line in pf.errors:
            err_console.print(line, markup=False)
        raise SystemExit(EXIT_USAGE)
    return pf


def cmd_validate(args: argparse.Namespace) -> int:
    check_paths = not args.no_path_check
    spec = _load(args.study, check_paths)
    pf = _preflight(spec, args.study, check_paths)
    for note in pf.notes:
        console.print(f"note: {note}", markup=False)
    space = pf.driver.space if pf.driver else None
    n = len(pf.configs) if pf.exact and pf.configs else None
    rejected = f", {pf.n_rejected} of them rejected by the rules (servetune plan lists why)" if n and pf.n_rejected else ""
    console.print(f"{args.study}: ok — study {spec.name!r}, model {pf.driver.model.name if pf.driver else spec.model.path}, "
                  f"engines {', '.join(e.name for e in spec.engines)}, "
                  f"{len(space.dimensions) if space else len(spec.search)} parameters"
                  + (f" ({n} configurations{rejected})" if n else "") + f", {spec.budget.trials} trials", markup=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import time

    spec = _load(args.study)
    _preflight(spec, args.study)
    if args.output_dir:
        spec.output_dir = args.output_dir
    if args.trials:
        spec.budget.trials = args.trials
    from servetune.optimizer import resume_check
    from servetune.optimizer.driver import StudyDriver, StudyLocked

    changed = resume_check.compare(spec)
    if args.new and changed.stored:
        old_dir = spec.run_dir
        spec.name, spec.output_dir = resume_check.fresh_name(spec)
        console.print(f"a new study [bold]{spec.name}[/] in {spec.run_dir} ({old_dir} is kept as it is)")
    elif changed.refused:
        for line in changed.refusal(args.study):
            err_console.print(line, markup=False)
        return EXIT_USAGE
    elif changed.allowed:
        console.print("resuming with changes that keep the results comparable: " + "; ".join(changed.allowed),
                      markup=False)

    t0 = time.monotonic()
    spec_objectives = spec.objective_keys()
    from servetune.optimizer.progress import RunProgress

    live = RunProgress(console, spec, _fmt_params)

    def on_event(kind: str, data: dict[str, Any]) -> None:
        _print_event(kind, data)
        live.event(kind, data)

    def _print_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            console.print(f"[bold]servetune[/] study [bold]{spec.name}[/]: {data['done']} of {data['budget']} trials "
                          f"done, results in {data['run_dir']}")
        elif kind == "resumed":
            console.print(f"[yellow]resumed: {data['requeued']} trial(s) interrupted earlier were queued again[/]")
        elif kind == "launch":
            tag = " [cyan](baseline)[/]" if data["baseline"] else ""
            verb = "queued" if data.get("queued") else "start "
            console.print(f"  #{data['number']:<3} {verb} {data['engine']} on {data['gpus']} GPU(s): "
                          f"{_fmt_params(data['params'])}{tag}", markup=True)
        elif kind == "result":
            console.print("  " + _result_line(data["result"], spec_objectives), markup=True)
        elif kind == "interrupted":
            err_console.print("interrupted: stopping the running trials and their engines…")
        elif kind == "repeat":
            console.print(f"  #{data['number']:<3} repeat  (re-measuring a Pareto candidate)")
        elif kind == "note":
            from rich.markup import escape

            console.print(f"  [dim]{escape(data['text'])}[/]", markup=True, highlight=False)

    try:
        driver = StudyDriver(spec, on_event=on_event, ray_address=args.ray_address)
        try:
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
        err_console.print(f"{args.study}:1: {e}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err_console.print("interrupted: completed trials are saved; rerun the same command to continue")
        return 130
    console.print(f"done in {time.monotonic() - t0:.0f} s ({outcome.stopped_because})")
    if outcome.gpu_use:
        u = outcome.gpu_use
        console.print(f"GPU use: {u['utilization']:.0%} ({u['busy_gpu_s']:,.0f} of {u['available_gpu_s']:,.0f} "
                      "GPU-seconds held by trials)")
    _print_pareto(outcome.run_dir, spec_objectives)
    _print_vs_baseline(outcome.run_dir)
    if not args.no_report:
        from servetune.reports.html import write_report

        path = write_report(outcome.run_dir)
        console.print(f"report: [bold]{path}[/]")
    return 0


def _result_line(r, objectives) -> str:
    head = f"#{r.number:<3} [bold]{r.state:<9}[/]"
    if r.duplicate_of is not None:
        head += f" (= #{r.duplicate_of})"
    if r.state != "complete":
        reason = (r.failure or {}).get("reason", "")
        kind = (r.failure or {}).get("kind", "")
        return f"{head} [red]{kind}[/]: {_esc(reason)}"
    bits = []
    for label, sr in r.scenarios.items():
        s = sr.get("summary", {})
        sla = sr.get("sla_met")
        verdict = "" if sla is None else (" [green]SLA ok[/]" if sla else " [red]SLA missed[/]")
        if sr.get("contaminated"):
            verdict = " [yellow]contaminated (audit failed twice: no verdict)[/]"
        bits.append(f"{label}: {s.get('output_tokens_per_s', 0):,.0f} tok/s "
                    f"({s.get('output_tokens_per_s_per_gpu', 0):,.0f}/GPU), p99 TTFT {s.get('ttft_p99_ms', float('nan')):.0f} ms, "
                    f"p99 TPOT {s.get('tpot_p99_ms', float('nan')):.1f} ms{verdict}")
    if r.quality and r.quality.get("kind"):
        from servetune.optimizer.quality import describe

        color = {True: "green", False: "red"}.get(r.quality.get("passed"), "dim")
        bits.append(f"[{color}]{_esc(describe(r.quality))}[/]")
    return f"{head} {'; '.join(bits)}  [dim]{r.wall_s:.0f} s[/]"


def _print_vs_baseline(run_dir: Path) -> None:
    """summary.json's best-vs-baseline lines: a ratio only when both sides met the SLA, else why not."""
    import json

    try:
        entries = json.loads((Path(run_dir) / "summary.json").read_text()).get("vs_baseline") or []
    except (OSError, ValueError):
        return
    for e in entries:
        console.print(("[bold]" if e.get("ratio") is not None else "[yellow]") + _esc(e["text"]) + "[/]")


def _esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _print_pareto(run_dir: Path, objectives) -> None:
    from rich.table import Table

    from servetune.reports.model import load_run
    from servetune.reports.pareto import pareto_mask

    run = load_run(run_dir)
    df = run.trials
    if df.empty:
        console.print("no trials")
        return
    cols = [f"{s}.{m}" for s, m in objectives]
    spec_dirs = [o.get("direction", "maximize") for o in run.spec.get("objectives", [])]
    ok = df[(df["state"] == "complete")].copy()
    for c in cols:
        if c not in ok:
            ok[c] = float("nan")
    valid_cols = [c for c in ok.columns if c.endswith(".sla_met")]
    for c in valid_cols:
        ok = ok[ok[c].fillna(True).astype(bool)]
    for c in [c for c in ok.columns if c.endswith(".contaminated")]:
        ok = ok[~ok[c].eq(True)]  # a contaminated measurement is no point of the front
    ok = ok[run.quality_ok().loc[ok.index]]
    if ok.empty:
        console.print("[yellow]no trial met every SLA" + (f" and the {run.quality_kind} limits" if run.quality_kind
                                                          else "") + "[/]")
        return
    # a trial that took another's result (same config) is that trial's row, named beside it
    also: dict[int, list[int]] = {}
    if "duplicate_of" in ok:
        dups = ok[ok["duplicate_of"].notna()]
        for n, dup in zip(dups["number"], dups["duplicate_of"]):
            also.setdefault(int(dup), []).append(int(n))
        ok = ok[ok["duplicate_of"].isna()]
    mask = pareto_mask(ok[cols].to_numpy(dtype=float), spec_dirs)
    front = ok[mask].sort_values(cols[0], ascending=spec_dirs[0] == "minimize")
    table = Table(title="Pareto-optimal trials (SLA met" + (f", {run.quality_kind} limits met)" if run.quality_kind
                                                            else ")"))
    table.add_column("#", justify="right")
    table.add_column("config")
    for c in cols:
        table.add_column(c, justify="right")
    for _, row in front.iterrows():
        params = {k.removeprefix("param."): row[k] for k in row.index if k.startswith("param.") and row[k] == row[k]}
        mark = " (baseline)" if row.get("is_baseline") else ""
        if also.get(int(row["number"])):
            mark += " (also #" + ", #".join(map(str, also[int(row["number"])])) + ")"
        table.add_row(str(int(row["number"])), _esc(_fmt_params(params)) + mark, *[f"{row[c]:,.1f}" for c in cols])
    console.print(table)


def cmd_report(args: argparse.Namespace) -> int:
    from servetune.reports.command import run as report_command

    return report_command(args, lambda m: console.print(m, markup=False), lambda m: err_console.print(m, markup=False))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="servetune", description="Find the inference-server configuration that serves "
                                "your model, on your GPUs, for your workload, best.")
    p.add_argument("--version", action="version", version=f"servetune {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a study")
    r.add_argument("study")
    r.add_argument("--output-dir", help="override the study's output_dir")
    r.add_argument("--trials", type=int, help="override budget.trials")
    r.add_argument("--ray-address", help="join an existing Ray cluster (default: a local instance)")
    r.add_argument("--no-report", action="store_true")
    r.add_argument("--new", action="store_true",
                   help="start a fresh study (NAME-2, NAME-3, ...) instead of resuming the one in the run directory; "
                        "needed when the study file changes what is measured or searched")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate", help="check a study file")
    v.add_argument("study")
    v.add_argument("--no-path-check", action="store_true",
                   help="do not look for model.path and the dataset file (check a GPU host's study elsewhere)")
    v.set_defaults(func=cmd_validate)
    from servetune.reports.command import USAGE as REPORT_USAGE, add_arguments as report_arguments

    rep = sub.add_parser("report", help="the HTML report of a run directory; 'serve' a local report app; "
                         "'compare' two studies", usage=REPORT_USAGE.removeprefix("usage: "))
    report_arguments(rep)
    rep.set_defaults(func=cmd_report)
    from servetune.optimizer.export_cli import add_parser as add_export_parser

    add_export_parser(sub)
    from servetune.optimizer import bench_cli, list_runs, plan

    bench_cli.add_parser(sub)
    plan.add_parser(sub)
    list_runs.add_parser(sub)
    from servetune.optimizer import rayjob

    rayjob.add_parser(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("servetune")
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # --version, --help and usage errors end here
        return int(args.func(args) or 0)
    except SystemExit as e:
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
