"""The study report: one self-contained HTML file that opens from disk with no network.

Plotly's JavaScript is inlined once; every figure travels as JSON in a single ``application/json`` script
block (``tojson`` escapes ``<``, ``>``, ``&`` so no value can close the tag), and everything else goes through
Jinja2 with autoescape on. The page stays readable without JavaScript: the trial table is plain HTML.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from plotly.offline import get_plotlyjs

from servetune.reports.charts import Chart, importance_chart, scenario_charts
from servetune.reports.importance import param_importances
from servetune.reports.model import PARAM, Objective, Run, Scenario, load_run
from servetune.reports.pareto import pareto_mask
from servetune.reports.units import axis_title, fmt_metric, fmt_number, fmt_param, metric_label

TEMPLATES = Path(__file__).with_name("templates")
TABLE_METRICS = ["output_tokens_per_s", "output_tokens_per_s_per_gpu", "tokens_per_s_per_user",
                 "ttft_p99_ms", "tpot_p99_ms", "error_rate"]
LOG_TAIL_LINES = 12
LOG_TAIL_CHARS = 3000


@dataclass
class Headline:
    label: str  # "server · output tokens/s/GPU"
    direction: str
    best: str = "—"
    best_trial: int | None = None
    baseline: str = "—"
    ratio: str = ""  # "1.65× baseline"
    note: str = ""


@dataclass
class TableColumn:
    group: str  # "parameters", a scenario name, or "" for trial facts
    title: str
    key: str


@dataclass
class TableRow:
    number: int
    state: str
    is_baseline: bool
    on_front: bool
    cells: list[dict[str, Any]] = field(default_factory=list)  # {"text", "cls", "title"}
    note: str = ""


def write_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Render ``RUN_DIR/report.html`` (or ``out_path``) from what the run directory holds now."""
    run = load_run(run_dir)
    out = Path(out_path) if out_path is not None else run.run_dir / "report.html"
    text = render_report(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside and rename: a browser reloading mid-write never sees half a report.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def render_report(run: Run) -> str:
    scenarios = []
    charts: list[Chart] = []
    for i, sc in enumerate(run.scenarios):
        cs = scenario_charts(run, sc, f"sc{i}")
        charts += cs
        scenarios.append({"name": sc.name, "kind": sc.kind, "anchor": f"scenario-{i}", "charts": cs,
                          "facts": _scenario_facts(sc)})
    imp = param_importances(run)
    imp_chart = importance_chart(imp, "importance-chart")
    if imp_chart:
        charts.append(imp_chart)

    front_numbers, front_label = objective_front(run)
    columns, rows = trial_table(run, front_numbers)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(
        run=run,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        states=run.state_counts(),
        n_sla_met=int(run.sla_met_all([s.name for s in run.scenarios]).sum()) if run.scenarios else 0,
        n_not_valid=_count_not_valid(run),
        objectives=[f"{o.direction} {o.scenario} · {metric_label(o.metric)}" for o in run.objectives],
        headlines=headlines(run),
        scenarios=scenarios,
        columns=columns,
        column_groups=[(g, len(list(it))) for g, it in itertools.groupby(columns, key=lambda c: c.group)],
        rows=rows,
        front_label=front_label,
        failures=failures(run),
        invalid=invalid_measurements(run),
        importance={"chart": imp_chart, "note": imp.note},
        figures={c.id: c.figure for c in charts},
        # A literal "</script" inside the bundle would end the tag early; the bundle has none today.
        plotlyjs=get_plotlyjs().replace("</script", "<\\/script"),
    )


# -- the header -----------------------------------------------------------------------------------------------

def _objectives_or_default(run: Run) -> list[Objective]:
    if run.objectives:
        return run.objectives
    if run.scenarios:  # a study file without objectives still has a headline: GPU throughput
        return [Objective("output_tokens_per_s_per_gpu", run.scenarios[0].name, "maximize")]
    return []


def headlines(run: Run) -> list[Headline]:
    """Per objective: the best trial that met the SLA, and how it compares with the engine's defaults."""
    out = []
    base = run.baseline()
    for o in _objectives_or_default(run):
        h = Headline(label=f"{o.scenario} · {metric_label(o.metric)}", direction=o.direction)
        col = o.column
        if col not in run.trials:
            h.note = "no trial has measured it yet"
            out.append(h)
            continue
        vals = pd.to_numeric(run.trials[col], errors="coerce").where(run.sla_met(o.scenario))
        vals = vals[np.isfinite(vals)]
        if vals.empty:
            h.note = "no trial has met the SLA yet"
            out.append(h)
            continue
        idx = vals.idxmax() if o.direction == "maximize" else vals.idxmin()
        best = float(vals[idx])
        h.best, h.best_trial = fmt_metric(best, o.metric), int(run.trials.at[idx, "number"])
        b = _finite(base.get(col)) if base is not None else None
        if base is None:
            h.note = "no baseline trial"
        elif b is None:
            h.note = f"baseline trial #{int(base['number'])} has no value ({base['state']})"
        else:
            h.baseline = fmt_metric(b, o.metric)
            if b != 0:
                h.ratio = f"{best / b:.2f}× baseline"
            if base.get(f"{o.scenario}.sla_met") is False:
                h.note = "the baseline missed the SLA"
        out.append(h)
    return out


def _count_not_valid(run: Run) -> int:
    """Complete trials with a scenario run that loadgen's rules reject (too short, early stopping, ...)."""
    bad = pd.Series(False, index=run.trials.index)
    for sc in run.scenarios:
        if f"{sc.name}.valid" in run.trials:
            bad |= run.trials[f"{sc.name}.valid"].eq(False)
    return int((run.complete & bad).sum())


def _finite(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _scenario_facts(sc: Scenario) -> list[str]:
    facts = [f"kind {sc.kind}"]
    if sc.qps:
        facts.append(f"{fmt_number(sc.qps)} queries/s")
    if sc.ttft_limit_ms:
        facts.append(f"SLA p99 TTFT ≤ {fmt_metric(sc.ttft_limit_ms, 'ttft_p99_ms')}")
    if sc.tpot_limit_ms:
        facts.append(f"SLA p99 TPOT ≤ {fmt_metric(sc.tpot_limit_ms, 'tpot_p99_ms')}")
    if not (sc.ttft_limit_ms or sc.tpot_limit_ms):
        facts.append("no latency SLA")
    return facts


# -- the study's own Pareto set -----------------------------------------------------------------------------

def objective_front(run: Run) -> tuple[set[int], str]:
    """Trial numbers on the front of the study's objectives, among trials meeting the SLA of every scenario
    they use (the same feasibility the optimizer gives Optuna)."""
    objs = _objectives_or_default(run)
    cols = [o.column for o in objs]
    if not objs or any(c not in run.trials for c in cols):
        return set(), ""
    pool = run.trials[run.sla_met_all(list(dict.fromkeys(o.scenario for o in objs)))]
    if pool.empty:
        return set(), ""
    values = pool[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    mask = pareto_mask(values, [o.direction for o in objs])
    return {int(n) for n in pool.loc[mask, "number"]}, ("Pareto-optimal" if len(objs) > 1 else "best")


# -- the trial table ----------------------------------------------------------------------------------------

def trial_table(run: Run, front_numbers: set[int]) -> tuple[list[TableColumn], list[TableRow]]:
    df = run.trials
    columns = [TableColumn("", "GPUs", "gpus")]
    columns += [TableColumn("parameters", c[len(PARAM):], c) for c in run.param_columns]
    for sc in run.scenarios:
        for m in TABLE_METRICS:
            if f"{sc.name}.{m}" in df:
                columns.append(TableColumn(sc.name, axis_title(m), f"{sc.name}.{m}"))
        if f"{sc.name}.sla_met" in df:
            columns.append(TableColumn(sc.name, "SLA", f"{sc.name}.sla_met"))
    columns.append(TableColumn("", "wall time (s)", "wall_s"))

    rows = []
    for _, r in df.iterrows():
        row = TableRow(number=int(r["number"]), state=str(r["state"]), is_baseline=bool(r["is_baseline"]),
                       on_front=int(r["number"]) in front_numbers)
        for c in columns:
            row.cells.append(_cell(r, c))
        notes = []
        if _present(r.get("duplicate_of")):
            notes.append(f"same config as trial #{int(r['duplicate_of'])}: its measurement is reused")
        if _present(r.get("failure_kind")) or _present(r.get("failure_reason")):
            kind = r["failure_kind"] if _present(r.get("failure_kind")) else r["state"]
            reason = r["failure_reason"] if _present(r.get("failure_reason")) else "no reason recorded"
            notes.append(f"{kind}: {reason}")
        # "run not valid" stays out of the row: it is often every trial of a short study, for one reason
        # (listed once under Failures), and the SLA cell already carries its ⚠.
        for m in _scenario_problems(r, run):
            if m["kind"] == "SLA missed":
                notes.append(f"{m['scenario']}: {m['kind']}: {m['reasons']}")
        row.note = "; ".join(notes)
        rows.append(row)
    return columns, rows


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _cell(r: pd.Series, c: TableColumn) -> dict[str, Any]:
    v = r.get(c.key)
    if c.group == "parameters":
        return {"text": fmt_param(v), "cls": "param", "title": ""}
    if c.key.endswith(".sla_met"):
        scen = c.key.rsplit(".", 1)[0]
        if v is True and r.get(f"{scen}.valid") is False:  # met, in a run loadgen rejects (often: too short)
            return {"text": "met ⚠", "cls": "ok", "title": f"run not valid: {r.get(f'{scen}.invalid_reasons')}"}
        if v is True:
            return {"text": "met", "cls": "ok", "title": ""}
        if v is False:
            return {"text": "missed", "cls": "bad", "title": str(r.get(f"{scen}.sla_reason") or "")}
        return {"text": "—", "cls": "na", "title": ""}
    if not _present(v):
        return {"text": "—", "cls": "na num", "title": ""}
    metric = c.key.rsplit(".", 1)[-1]
    text = fmt_metric(v, metric) if metric == "error_rate" else fmt_number(v)
    return {"text": text, "cls": "num", "title": ""}


# -- what went wrong ----------------------------------------------------------------------------------------

def failures(run: Run) -> list[dict[str, Any]]:
    df = run.trials
    bad = df[df["state"].isin(["failed", "rejected"]) | df["failure_kind"].notna()]
    out = []
    for _, r in bad.iterrows():
        out.append({"number": int(r["number"]), "state": r["state"],
                    "kind": r["failure_kind"] if _present(r.get("failure_kind")) else r["state"],
                    "reason": r.get("failure_reason") if _present(r.get("failure_reason")) else "no reason recorded",
                    "params": ", ".join(f"{c[len(PARAM):]}={fmt_param(r[c])}" for c in run.param_columns
                                        if _present(r.get(c))),
                    "log_tail": _log_tail(r.get("trial_dir"))})
    return out


def _scenario_problems(r: pd.Series, run: Run) -> list[dict[str, Any]]:
    out = []
    for sc in run.scenarios:
        if r.get(f"{sc.name}.sla_met") is False:
            out.append({"number": int(r["number"]), "scenario": sc.name, "kind": "SLA missed",
                        "reasons": r.get(f"{sc.name}.sla_reason") or "no reason recorded"})
        elif r.get(f"{sc.name}.valid") is False:
            out.append({"number": int(r["number"]), "scenario": sc.name, "kind": "run not valid",
                        "reasons": r.get(f"{sc.name}.invalid_reasons") or "no reason recorded"})
    return out


def invalid_measurements(run: Run) -> list[dict[str, Any]]:
    """Measurements that missed a latency limit or are not valid runs by loadgen's rules, one entry per
    distinct (scenario, problem, reason) with the trials that share it."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for _, r in run.trials[run.complete].iterrows():
        for m in _scenario_problems(r, run):
            groups.setdefault((m["scenario"], m["kind"], m["reasons"]), []).append(m["number"])
    out = [{"scenario": s, "kind": k, "reasons": why, "numbers": ns} for (s, k, why), ns in groups.items()]
    return sorted(out, key=lambda d: (d["kind"] != "SLA missed", d["numbers"][0]))


def _log_tail(trial_dir: Any) -> str:
    if not isinstance(trial_dir, str):
        return ""
    p = Path(trial_dir) / "engine.log"
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))  # logs can be gigabytes; the cause is at the end
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])[-LOG_TAIL_CHARS:]


__all__ = ["write_report", "render_report", "headlines", "objective_front", "trial_table", "failures",
           "invalid_measurements"]
