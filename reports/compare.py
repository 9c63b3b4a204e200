"""Two studies on one chart: vLLM against SGLang, H100 against H200, before and after a change.

Scenarios are matched by name (else by kind). Each chart draws both studies' trials in the study's colour:
the Pareto front among trials that met the SLA as a line, dominated trials faded, SLA misses as faded
crosses, the baseline as a star. A table puts each study's best numbers (SLA met) side by side with the
ratio, and the best configurations' parameters next to each other.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from servetune.reports.charts import _esc, _log_ticks, _plain, _wants_log, chart_specs, hover_text, template
from servetune.reports.html import headlines, jinja_env, plotly_js, write_text_atomic
from servetune.reports.model import PARAM, Run, Scenario, load_run
from servetune.reports.pareto import front
from servetune.reports.units import axis_title, fmt_metric, fmt_param, metric_label

COLORS = ("#1f5fbf", "#d9480f")  # study A, study B
BEST_METRICS = [("output_tokens_per_s_per_gpu", "maximize"), ("output_tokens_per_s", "maximize"),
                ("tokens_per_s_per_user", "maximize"), ("tpot_p99_ms", "minimize"), ("ttft_p99_ms", "minimize")]


@dataclass
class Side:
    key: str  # "A" | "B"
    run: Run
    label: str
    color: str
    link: str = ""  # where a click on one of its points goes (served app), "" for none


@dataclass
class ComparedScenario:
    title: str  # "server" or "server ↔ server-8"
    a: Scenario
    b: Scenario
    charts: list[dict[str, Any]] = field(default_factory=list)  # {"id", "title", "figure"}


def labels(a: Run, b: Run) -> tuple[str, str]:
    la, lb = a.name, b.name
    if la == lb:
        la, lb = a.run_dir.name, b.run_dir.name
    if la == lb:
        la, lb = f"{la} (A)", f"{lb} (B)"
    return la, lb


def match_scenarios(a: Run, b: Run) -> tuple[list[tuple[Scenario, Scenario]], list[str]]:
    """Pairs of scenarios to draw together, and notes on the ones left unpaired."""
    bn = {s.name: s for s in b.scenarios}
    pairs = [(s, bn[s.name]) for s in a.scenarios if s.name in bn]
    used_a, used_b = {p[0].name for p in pairs}, {p[1].name for p in pairs}
    for s in a.scenarios:  # same kind under another name: offline ↔ offline-long
        if s.name in used_a:
            continue
        other = next((t for t in b.scenarios if t.kind == s.kind and t.name not in used_b), None)
        if other is not None:
            pairs.append((s, other))
            used_a.add(s.name)
            used_b.add(other.name)
    notes = [f"scenario {s.name} is only in A" for s in a.scenarios if s.name not in used_a]
    notes += [f"scenario {s.name} is only in B" for s in b.scenarios if s.name not in used_b]
    return pairs, notes


def _points(run: Run, sc: Scenario, xc: str, yc: str) -> pd.DataFrame:
    df = run.trials
    if df.empty or xc not in df or yc not in df:
        return df.iloc[0:0]
    pts = df[run.complete & df["duplicate_of"].isna()].copy()
    pts[xc] = pd.to_numeric(pts[xc], errors="coerce")
    pts[yc] = pd.to_numeric(pts[yc], errors="coerce")
    pts = pts[np.isfinite(pts[xc]) & np.isfinite(pts[yc])]
    pts["_sla_met"] = run.feasible(sc.name).loc[pts.index]  # the SLA and the study's quality limits
    return pts


def compare_chart(sides: list[Side], scs: list[Scenario], spec, chart_id: str) -> dict | None:
    fig = go.Figure(_validate=False)  # built from known-good attributes; validation is most of the cost
    xs, ys = [], []
    limits = []
    for side, sc in zip(sides, scs):
        xc, yc = f"{sc.name}.{spec.x}", f"{sc.name}.{spec.y}"
        pts = _points(side.run, sc, xc, yc)
        if pts.empty:
            continue
        xs += pts[xc].tolist()
        ys += pts[yc].tolist()
        on = front(pts, xc, yc, spec.x_dir, spec.y_dir, only_valid_col="_sla_met")
        rest = pts[pts["_sla_met"] & ~pts.index.isin(on.index)]
        missed = pts[~pts["_sla_met"]]
        params = side.run.param_columns
        name = _esc(side.label)

        def trace(rows, **kw):
            return go.Scatter(x=rows[xc].tolist(), y=rows[yc].tolist(), legendgroup=side.key,
                              customdata=[[f"<b>{name}</b><br>" + hover_text(r, sc.name, params), int(r["number"]),
                                           side.key] for _, r in rows.iterrows()],
                              hovertemplate="%{customdata[0]}<extra></extra>", **kw)

        if not rest.empty:
            fig.add_trace(trace(rest, name=f"{name}: dominated", mode="markers", showlegend=False,
                                marker=dict(color=side.color, size=8, opacity=0.3)))
        if not missed.empty:
            fig.add_trace(trace(missed, name=f"{name}: SLA missed", mode="markers", showlegend=False,
                                marker=dict(color=side.color, size=9, symbol="x-thin-open", opacity=0.45,
                                            line=dict(width=2, color=side.color))))
        fig.add_trace(trace(on, name=f"{name}: Pareto front", mode="lines+markers",
                            line=dict(color=side.color, width=2.5),
                            marker=dict(color=side.color, size=10, line=dict(color="white", width=1))))
        base = pts[pts["is_baseline"].eq(True)]
        if not base.empty:
            fig.add_trace(trace(base, name=f"{name}: baseline", mode="markers", showlegend=False,
                                marker=dict(color=side.color, size=16, symbol="star",
                                            line=dict(color="#1f2937", width=1))))
        limit = {"tpot_p99_ms": sc.tpot_limit_ms, "ttft_p99_ms": sc.ttft_limit_ms}.get(spec.x)
        if limit:
            limits.append(limit)
    if not fig.data:
        return None
    x_log = _wants_log(xs + limits)
    y_log = _wants_log(ys)
    for limit in sorted(set(limits)):
        fig.add_shape(type="line", xref="x", yref="paper", x0=limit, x1=limit, y0=0, y1=1,
                      line=dict(color="#d62728", width=1.5, dash="dash"))
        fig.add_annotation(xref="x", yref="paper", x=math.log10(limit) if x_log else limit, y=1, yanchor="bottom",
                           showarrow=False, font=dict(color="#d62728", size=11),
                           text=f"SLA {fmt_metric(limit, spec.x)}")
    if x_log:
        fig.update_xaxes(**_log_ticks(xs + limits))
    if y_log:
        fig.update_yaxes(**_log_ticks(ys))
    title = f"{metric_label(spec.y)} vs {metric_label(spec.x)}"
    fig.update_layout(
        height=430, margin=dict(l=70, r=20, t=48, b=90),
        title=dict(text=_esc(title), x=0.01, font=dict(size=14)),
        xaxis=dict(title=dict(text=axis_title(spec.x)), type="log" if x_log else "linear", zeroline=False),
        yaxis=dict(title=dict(text=axis_title(spec.y)), type="log" if y_log else "linear"),
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), hovermode="closest",
        hoverlabel=dict(align="left", bgcolor="white", font=dict(color="#1f2937", size=12)))
    return {"id": chart_id, "title": title, "figure": _plain(fig)}


def best_table(sides: list[Side], pairs: list[tuple[Scenario, Scenario]]) -> list[dict[str, Any]]:
    """Per paired scenario and metric: each study's best trial that met the SLA, and B against A."""
    rows = []
    for sa, sb in pairs:
        for metric, direction in BEST_METRICS:
            cells: list[tuple[float | None, int | None]] = []  # (best value, its trial number) per side
            for side, sc in zip(sides, (sa, sb)):
                col = f"{sc.name}.{metric}"
                if col not in side.run.trials:
                    cells.append((None, None))
                    continue
                vals = pd.to_numeric(side.run.trials[col], errors="coerce").where(side.run.feasible(sc.name))
                vals = vals[np.isfinite(vals)]
                if vals.empty:
                    cells.append((None, None))
                    continue
                idx = vals.idxmax() if direction == "maximize" else vals.idxmin()
                cells.append((float(vals[idx]), int(side.run.trials.at[idx, "number"])))
            if all(v is None for v, _ in cells):
                continue
            (va, na), (vb, nb) = cells
            ratio = ""
            if va and vb:
                r = vb / va
                ratio = f"{r:.2f}×"
            better = ""
            if va is not None and vb is not None and va != vb:
                better = "B" if (vb > va) == (direction == "maximize") else "A"
            rows.append({"scenario": sa.name if sa.name == sb.name else f"{sa.name} ↔ {sb.name}",
                         "metric": metric_label(metric), "direction": direction,
                         "a": fmt_metric(va, metric) if va is not None else "—", "a_trial": na, "a_v": va,
                         "b": fmt_metric(vb, metric) if vb is not None else "—", "b_trial": nb, "b_v": vb,
                         "ratio": ratio, "better": better})
    return rows


def best_configs(sides: list[Side]) -> dict[str, Any]:
    """The parameters of each study's best trial on its first objective (SLA met), side by side."""
    best = []
    for side in sides:
        h = headlines(side.run)
        n = h[0].best_trial if h else None
        row = None
        if n is not None:
            row = side.run.trials[side.run.trials["number"].eq(n)].iloc[0]
        best.append((n, row, h[0].label if h else ""))
    names = list(dict.fromkeys(c[len(PARAM):] for s in sides for c in s.run.param_columns))
    rows = []
    for name in names:
        vals = []
        for _, row, _ in best:
            v = row.get(PARAM + name) if row is not None else None
            vals.append(fmt_param(v) if row is not None else "—")
        rows.append({"name": name, "a": vals[0], "b": vals[1], "differs": vals[0] != vals[1]})
    return {"a_trial": best[0][0], "b_trial": best[1][0], "a_label": best[0][2], "b_label": best[1][2], "rows": rows}


def render_compare(run_a: Run, run_b: Run, *, mode: str = "static", links: tuple[str, str] = ("", ""),
                   version: str = "", poll: str = "", base_url: str = "") -> str:
    la, lb = labels(run_a, run_b)
    sides = [Side("A", run_a, la, COLORS[0], links[0]), Side("B", run_b, lb, COLORS[1], links[1])]
    pairs, notes = match_scenarios(run_a, run_b)
    scenarios = []
    figures = {}
    for i, (sa, sb) in enumerate(pairs):
        cs = ComparedScenario(sa.name if sa.name == sb.name else f"{sa.name} ↔ {sb.name}", sa, sb)
        for j, spec in enumerate(chart_specs()):
            c = compare_chart(sides, [sa, sb], spec, f"cmp{i}-{j}")
            if c is not None:
                cs.charts.append(c)
                figures[c["id"]] = c["figure"]
        scenarios.append(cs)
    page = {"mode": mode, "version": version, "poll": poll, "base": base_url,
            "links": {"A": links[0], "B": links[1]}, "title": f"{la} vs {lb}"}
    return jinja_env().get_template("compare.html.j2").render(
        sides=sides, scenarios=scenarios, notes=notes, best=best_table(sides, pairs), configs=best_configs(sides),
        page=page, mode=mode, figures=figures, template=template(),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        plotlyjs=plotly_js() if mode == "static" else "")


def write_compare(run_a: str | Path, run_b: str | Path, out_path: str | Path | None = None) -> Path:
    """Render the comparison of two run directories to ``out_path`` (default: next to the runs, in their
    common parent directory, as ``compare-A-vs-B.html``)."""
    a, b = load_run(run_a), load_run(run_b)
    if out_path is None:
        pa, pb = Path(run_a).resolve(), Path(run_b).resolve()
        out = Path(os.path.commonpath([pa.parent, pb.parent])) / f"compare-{pa.name}-vs-{pb.name}.html"
    else:
        out = Path(out_path)
    write_text_atomic(out, render_compare(a, b))
    return out


__all__ = ["render_compare", "write_compare", "match_scenarios", "best_table", "best_configs", "labels"]
