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
import markupsafe
import numpy as np
import pandas as pd
from plotly.offline import get_plotlyjs

from servetune.optimizer.records import gpu_use
from servetune.optimizer.run_dir import read_sessions
from servetune.reports.analysis import sla_costs
from servetune.reports.charts import Chart, importance_chart, scenario_charts, template
from servetune.reports.details import all_details, log_tail
from servetune.reports.importance import param_importances
from servetune.reports.model import PARAM, Objective, Run, Scenario, load_run
from servetune.reports.pareto import pareto_mask
from servetune.reports.roofline import EXPLANATION as ROOFLINE_EXPLANATION
from servetune.reports.roofline import fractions as roofline_fractions
from servetune.reports.units import axis_title, fmt_metric, fmt_number, fmt_param, metric_label

TEMPLATES = Path(__file__).with_name("templates")
ASSETS = Path(__file__).with_name("assets")
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
    tip: str = ""  # the header's tooltip


@dataclass
class TableRow:
    number: int
    state: str
    is_baseline: bool
    on_front: bool
    cells: list[dict[str, Any]] = field(default_factory=list)  # {"text", "cls", "title", "v"}
    note: str = ""


def write_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Render ``RUN_DIR/report.html`` (or ``out_path``) from what the run directory holds now."""
    run = load_run(run_dir)
    out = Path(out_path) if out_path is not None else run.run_dir / "report.html"
    write_text_atomic(out, render_report(run))
    return out


def write_text_atomic(out: Path, text: str) -> None:
    """Write beside and rename: a browser reloading mid-write never sees half a page."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def jinja_env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["asset"] = asset
    env.filters["metric_label"] = metric_label
    return env


def asset(name: str) -> str:
    """A CSS/JS file of reports/assets, for inlining (``</`` cannot end the surrounding tag early)."""
    return (ASSETS / name).read_text(encoding="utf-8").replace("</", "<\\/")


def plotly_js() -> str:
    # A literal "</script" inside the bundle would end the tag early; the bundle has none today.
    return get_plotlyjs().replace("</script", "<\\/script")


def render_report(run: Run, *, mode: str = "static", study_id: str = "", version: str = "",
                  base_url: str = "") -> str:
    """The report page. ``static``: one offline file, every trial's drill-down inlined. ``serve``: the page of
    ``servetune report serve``, which loads Plotly from the server, fetches drill-downs on demand and polls
    for new trials (``study_id``/``version``/``base_url`` say where and what it shows)."""
    scenarios = []
    charts: list[Chart] = []
    for i, sc in enumerate(run.scenarios):
        cs = scenario_charts(run, sc, f"sc{i}")
        charts += cs
        scenarios.append({"name": sc.name, "kind": sc.kind, "anchor": f"scenario-{i}", "charts": cs,
                          "facts": _scenario_facts(sc), "verdict": scenario_verdict(run, sc)})
    imp = param_importances(run)
    imp_chart = importance_chart(imp, "importance-chart")
    if imp_chart:
        charts.append(imp_chart)

    front_numbers, front_label = objective_front(run)
    columns, rows = trial_table(run, front_numbers)
    page = {"mode": mode, "study": study_id, "version": version, "base": base_url,
            "trials": len(run.trials), "title": run.name}
    return jinja_env().get_template("report.html.j2").render(
        run=run,
        mode=mode,
        page=page,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        states=run.state_counts(),
        n_sla_met=int(run.sla_met_all([s.name for s in run.scenarios]).sum()) if run.scenarios else 0,
        quality=quality_summary(run),
        n_not_valid=_count_not_valid(run),
        gpu_use=gpu_use(run.trials.to_dict("records"), run.gpu_count, read_sessions(run.run_dir))
        if run.gpu_count and len(run.trials) else {},
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
        sla_costs=sla_costs(run),
        roofline_note=ROOFLINE_EXPLANATION,
        figures={c.id: c.figure for c in charts},
        details=all_details(run) if mode == "static" else {},
        template=template(),
        plotlyjs=plotly_js() if mode == "static" else "",
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
        vals = pd.to_numeric(run.trials[col], errors="coerce").where(run.feasible(o.scenario))
        vals = vals[np.isfinite(vals)]
        if vals.empty:
            h.note = "no trial has met the SLA yet" if run.sla_met(o.scenario).any() or run.quality_kind is None \
                else f"no trial has met the SLA and the {run.quality_kind} limits yet"
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
            # a ratio needs an SLA-valid level on both sides: a baseline that missed has no capacity to divide by
            if base.get(f"{o.scenario}.sla_met") is False:
                floor = _finite(base.get(f"{o.scenario}.max_qps_floor"))
                h.note = "no ratio: the baseline missed the SLA" + (
                    f" even at the floor {floor:g} req/s" if floor is not None else "")
            elif b != 0:
                h.ratio = f"{best / b:.2f}× baseline"
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


def scenario_verdict(run: Run, sc: Scenario) -> str:
    """loadgen's MLPerf-style verdict over the complete trials that ran ``sc``: how many runs were valid."""
    col = f"{sc.name}.valid"
    if col not in run.trials:
        return ""
    v = run.trials.loc[run.complete, col]
    judged = v[v.notna()]
    if judged.empty:
        return ""
    n_ok = int(judged.eq(True).sum())
    # A search trial does not require MLPerf's early stopping (the optimizer turns it off so a short level
    # still counts); such a run is valid for the study but not under MLPerf's rules, and is not labelled so.
    notes = run.trials.loc[judged.index, f"{sc.name}.notes"] if f"{sc.name}.notes" in run.trials else None
    short = 0 if notes is None else int((judged.eq(True) & notes.fillna("").astype(str)
                                         .str.contains("early stopping not met")).sum())
    text = f"valid runs (MLPerf rules): {n_ok - short} of {len(judged)}"
    if short:
        text += (f"; {short} more passed the study's checks but ran too short for MLPerf's early stopping "
                 "(a search trial does not require it)")
    if n_ok < len(judged):
        reasons = run.trials.loc[run.complete & run.trials[col].eq(False), f"{sc.name}.invalid_reasons"]
        common = reasons.dropna().astype(str).value_counts()
        if not common.empty:
            text += f" (most often: {common.index[0]})"
    return text


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
    they use and the study's quality limits (the same feasibility the optimizer gives Optuna)."""
    objs = _objectives_or_default(run)
    cols = [o.column for o in objs]
    if not objs or any(c not in run.trials for c in cols):
        return set(), ""
    pool = run.trials[run.feasible_all(list(dict.fromkeys(o.scenario for o in objs)))]
    if pool.empty:
        return set(), ""
    values = pool[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    mask = pareto_mask(values, [o.direction for o in objs])
    return {int(n) for n in pool.loc[mask, "number"]}, ("Pareto-optimal" if len(objs) > 1 else "best")


# -- the trial table ----------------------------------------------------------------------------------------

QUALITY_COLUMNS = [
    ("quality.exact_match", "exact match",
     "share of evaluation prompts whose greedy continuation equals the baseline's"),
    ("quality.first_divergence_mean", "1st divergence",
     "mean position of the first generated token that differs from the baseline's (tokens)"),
    ("quality.kl_mean", "mean KL", "per-token KL(baseline ‖ trial) over the top-K logprobs, nats, up to the first "
                                   "divergence"),
    ("quality.decisive_divergence", "beyond near-ties",
     "share of prompts whose first difference is not a near-tie: the baseline ranked the trial's token more than "
     "tie_margin nats below its own (a flip at a near-tie is rounding, e.g. another kernel)"),
    ("quality.accuracy", "task accuracy", "share of task prompts answered right"),
    ("quality.status", "verdict", "against the study's quality limits"),
]


def quality_summary(run: Run) -> dict[str, Any] | None:
    """The header's chip: what was checked, and how many trials missed the limits."""
    kind = run.quality_kind
    if not kind:
        return None
    col = run.trials["quality.passed"]
    judged = col[run.complete & col.apply(lambda v: isinstance(v, bool))]
    failed = int(judged.apply(lambda v: v is False).sum())
    checked = int((run.complete & run.trials["quality.kind"].notna()).sum())
    M = markupsafe.Markup  # format() escapes the arguments
    text = (M("{} limits missed <b>{}</b> of {}").format(kind, failed, len(judged)) if len(judged)
            else M("{} measured on <b>{}</b> trial{} (no limits)").format(kind, checked, "s" if checked != 1 else ""))
    return {"kind": kind, "judged": int(len(judged)), "failed": failed, "text": text,
            "tip": ("numerical drift against the baseline (the checkpoint's own precision) on random weights, "
                    "not a measure of answer quality" if kind == "drift"
                    else "greedy answers compared with the baseline's (docs/quality.md)")}


def trial_table(run: Run, front_numbers: set[int]) -> tuple[list[TableColumn], list[TableRow]]:
    df = run.trials
    columns = [TableColumn("", "GPUs", "gpus")]
    columns += [TableColumn("parameters", c[len(PARAM):], c) for c in run.param_columns]
    roofline: dict[str, dict[int, Any]] = {}
    for sc in run.scenarios:
        for m in TABLE_METRICS:
            if f"{sc.name}.{m}" in df:
                columns.append(TableColumn(sc.name, axis_title(m), f"{sc.name}.{m}"))
        if f"{sc.name}.output_tokens_per_s" in df:
            roofline[sc.name] = roofline_fractions(run, sc.name)
            columns.append(TableColumn(sc.name, "roofline (est.)", f"{sc.name}.roofline",
                                       tip=ROOFLINE_EXPLANATION))
        if f"{sc.name}.sla_met" in df:
            columns.append(TableColumn(sc.name, "SLA", f"{sc.name}.sla_met"))
    kind = run.quality_kind
    if kind:
        group = f"{kind} vs baseline" + (" (random weights)" if kind == "drift" else "")
        for key, title, tip in QUALITY_COLUMNS:
            if key in ("quality.accuracy", "quality.decisive_divergence") and not df[key].notna().any():
                continue
            columns.append(TableColumn(group, title, key, tip=tip))
    columns.append(TableColumn("", "wall time (s)", "wall_s"))

    rows = []
    for _, r in df.iterrows():
        number = int(r["number"])
        row = TableRow(number=number, state=str(r["state"]), is_baseline=bool(r["is_baseline"]),
                       on_front=number in front_numbers)
        for c in columns:
            if c.key.endswith(".roofline"):
                row.cells.append(_roofline_cell(roofline[c.key[:-len(".roofline")]].get(number)))
            else:
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
        for problem in _scenario_problems(r, run):
            if problem["kind"] == "SLA missed":
                notes.append(f"{problem['scenario']}: {problem['kind']}: {problem['reasons']}")
        if r.get("quality.passed") is False:
            notes.append(f"{r.get('quality.kind')} limits missed: {r.get('quality.reason') or 'no reason recorded'}")
        row.note = "; ".join(notes)
        rows.append(row)
    return columns, rows


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _roofline_cell(est: Any) -> dict[str, Any]:
    if est is None:
        return {"text": "—", "cls": "na num", "title": "", "v": ""}
    if est.fraction is None:
        return {"text": "—", "cls": "na num", "title": est.note, "v": ""}
    return {"text": f"{est.fraction:.0%}", "cls": "num", "v": round(est.fraction, 4),
            "title": f"estimate: {fmt_metric(est.measured_tok_s, 'output_tokens_per_s')} measured of a "
                     f"{fmt_metric(est.bound_tok_s, 'output_tokens_per_s')} roofline bound at mean concurrency "
                     f"{fmt_number(est.concurrency)}"}


def _sort_value(v: Any) -> Any:
    """What the page sorts and filters a cell by: numbers as numbers, the rest as text, absent as ""."""
    if not _present(v):
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        x = float(v)
        return int(x) if x.is_integer() and abs(x) < 1e15 else x  # 2, not 2.0, in the page and its CSV
    return str(v)


def _cell(r: pd.Series, c: TableColumn) -> dict[str, Any]:
    v = r.get(c.key)
    if c.group == "parameters":
        return {"text": fmt_param(v), "cls": "param", "title": "", "v": _sort_value(v)}
    if c.key == "quality.status":
        if not _present(v):
            return {"text": "—", "cls": "na", "title": "", "v": ""}
        tips = {"reference": "the baseline: the outputs every trial of its engine is compared with",
                "no limits": "measured; the study sets no quality limits"}
        cls = {"passed": "ok", "failed": "bad", "not checked": "bad" if r.get("quality.passed") is False else "na"}
        return {"text": str(v), "cls": cls.get(str(v), ""), "v": str(v),
                "title": str(r.get("quality.reason") or tips.get(str(v), ""))}
    if c.key in ("quality.exact_match", "quality.accuracy", "quality.decisive_divergence") and _present(v):
        return {"text": f"{float(v):.0%}", "cls": "num", "title": "", "v": _sort_value(v)}
    if c.key == "quality.kl_mean" and _present(v):
        return {"text": f"{float(v):.3g}", "cls": "num", "title": "", "v": _sort_value(v)}
    if c.key.endswith(".sla_met"):
        scen = c.key.rsplit(".", 1)[0]
        if v is True and r.get(f"{scen}.valid") is False:  # met, in a run loadgen rejects (often: too short)
            return {"text": "met ⚠", "cls": "ok", "title": f"run not valid: {r.get(f'{scen}.invalid_reasons')}",
                    "v": "met"}
        if v is True:
            return {"text": "met", "cls": "ok", "title": "", "v": "met"}
        if v is False:
            return {"text": "missed", "cls": "bad", "title": str(r.get(f"{scen}.sla_reason") or ""), "v": "missed"}
        if r.get(f"{scen}.contaminated") is True:  # the engine-side audit failed twice: no verdict either way
            return {"text": "contaminated", "cls": "bad", "title": str(r.get(f"{scen}.sla_reason") or ""),
                    "v": "contaminated"}
        return {"text": "—", "cls": "na", "title": "", "v": ""}
    if not _present(v):
        return {"text": "—", "cls": "na num", "title": "", "v": ""}
    metric = c.key.rsplit(".", 1)[-1]
    text = fmt_metric(v, metric) if metric == "error_rate" else fmt_number(v)
    return {"text": text, "cls": "num", "title": "", "v": _sort_value(v)}


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
                    "log_tail": log_tail(r.get("trial_dir"), LOG_TAIL_LINES, LOG_TAIL_CHARS)})
    return out


def _scenario_problems(r: pd.Series, run: Run) -> list[dict[str, Any]]:
    out = []
    for sc in run.scenarios:
        if r.get(f"{sc.name}.contaminated") is True:
            out.append({"number": int(r["number"]), "scenario": sc.name, "kind": "contaminated (no verdict)",
                        "reasons": r.get(f"{sc.name}.invalid_reasons") or "no reason recorded"})
        elif r.get(f"{sc.name}.sla_met") is False:
            out.append({"number": int(r["number"]), "scenario": sc.name, "kind": "SLA missed",
                        "reasons": r.get(f"{sc.name}.sla_reason") or "no reason recorded"})
        elif r.get(f"{sc.name}.valid") is False:
            out.append({"number": int(r["number"]), "scenario": sc.name, "kind": "run not valid",
                        "reasons": r.get(f"{sc.name}.invalid_reasons") or "no reason recorded"})
    return out


def invalid_measurements(run: Run) -> list[dict[str, Any]]:
    """Measurements that missed a latency limit, the quality limits, or are not valid runs by loadgen's rules,
    one entry per distinct (scenario, problem, reason) with the trials that share it."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for _, r in run.trials[run.complete].iterrows():
        for m in _scenario_problems(r, run):
            groups.setdefault((m["scenario"], m["kind"], m["reasons"]), []).append(m["number"])
        if r.get("quality.passed") is False:
            groups.setdefault(("outputs", f"{r.get('quality.kind')} limits missed",
                               str(r.get("quality.reason") or "no reason recorded")), []).append(int(r["number"]))
    out = [{"scenario": s, "kind": k, "reasons": why, "numbers": ns} for (s, k, why), ns in groups.items()]
    return sorted(out, key=lambda d: (d["kind"] == "run not valid", d["numbers"][0]))


__all__ = ["write_report", "render_report", "jinja_env", "asset", "plotly_js", "headlines", "scenario_verdict",
           "objective_front", "trial_table", "failures", "invalid_measurements"]
