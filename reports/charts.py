"""Plotly figures of a run: per-scenario Pareto charts, each trial's curve through its load levels, and the
importance bars.

Figures are returned as plain dicts (``Figure.to_plotly_json()``) built from Python lists, never numpy
arrays: plotly would otherwise encode arrays as base64 blobs, which the page can draw but nobody (and no
test) can read in the HTML. Every string that came from the user goes through :func:`_esc`, because Plotly
renders its own pseudo-HTML in labels and hover text.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from servetune.reports.importance import Importances
from servetune.reports.model import PARAM, Run, Scenario
from servetune.reports.pareto import front
from servetune.reports.units import axis_title, fmt_metric, fmt_number, fmt_param, metric_label

# Shown in hover boxes and the trial table, in this order, when the summary has them.
KEY_METRICS = ["output_tokens_per_s", "output_tokens_per_s_per_gpu", "tokens_per_s_per_user", "request_per_s",
               "ttft_p99_ms", "tpot_p99_ms", "itl_p99_ms", "e2e_p99_ms", "error_rate"]

# Trace names are part of the page's contract: tests and the legend both read them.
FRONT, DOMINATED, INVALID, BASELINE, FAILED = "Pareto front", "dominated", "SLA missed", "baseline", "failed"
CONTAMINATED = "contaminated (audit failed twice)"
LOSSY = "{kind} limits missed"  # .format(kind="quality" | "drift")

_BLUE, _GREY, _RED, _GOLD, _ORANGE = "#1f5fbf", "#8a94a6", "#d62728", "#f2b705", "#e07b00"
_BAR_COLORS = ["#1f5fbf", "#2a9d8f", "#8e6cc2", "#c77d1a"]
_LOG_SPAN = 30.0  # switch an axis to log when its values (and SLA line) span more than this factor


@dataclass(frozen=True)
class ChartSpec:
    x: str
    y: str
    x_dir: str
    y_dir: str


def chart_specs() -> list[ChartSpec]:
    lat = [("tpot_p99_ms", "minimize"), ("ttft_p99_ms", "minimize")]
    tput = ["output_tokens_per_s", "output_tokens_per_s_per_gpu"]
    specs = [ChartSpec(x, y, xd, "maximize") for x, xd in lat for y in tput]
    # The InferenceX-style trade-off: what a GPU earns against what each user sees.
    specs.append(ChartSpec("tokens_per_s_per_user", "output_tokens_per_s_per_gpu", "maximize", "maximize"))
    return specs


@dataclass
class Chart:
    id: str
    title: str
    figure: dict
    front_numbers: list[int]  # trials on this chart's Pareto front, in drawing order


def _esc(s: object) -> str:
    # quote=False: Plotly decodes &lt; &gt; &amp; but would print &quot; literally.
    return html.escape(str(s), quote=False)


def hover_text(row: pd.Series, scenario: str, param_cols: list[str]) -> str:
    head = f"<b>trial #{int(row['number'])}</b>" + (" · baseline" if row.get("is_baseline") else "")
    lines = [head]
    for c in param_cols:
        v = row.get(c)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        lines.append(f"{_esc(c[len(PARAM):])} = {_esc(fmt_param(v))}")
    lines.append("")
    for m in KEY_METRICS:
        v = row.get(f"{scenario}.{m}")
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            lines.append(f"{metric_label(m)}: {fmt_metric(v, m)}")
    if row.get(f"{scenario}.contaminated") is True:
        lines.append(f"<b>contaminated</b>, no verdict: {_esc(row.get(f'{scenario}.invalid_reasons') or '')}")
    elif row.get(f"{scenario}.sla_met") is False:
        lines.append(f"<b>SLA missed</b>: {_esc(row.get(f'{scenario}.sla_reason') or 'no reason recorded')}")
    elif row.get(f"{scenario}.valid") is False:
        lines.append(f"<b>run not valid</b>: {_esc(row.get(f'{scenario}.invalid_reasons') or 'no reason recorded')}")
    dirty = row.get(f"{scenario}.contaminated_levels")
    if isinstance(dirty, str) and dirty:
        lines.append(f"levels contaminated after a re-run (engine audit): {_esc(dirty)} (not judged)")
    kind = row.get("quality.kind")
    if isinstance(kind, str):
        figures = []
        em, kl = row.get("quality.exact_match"), row.get("quality.kl_mean")
        if isinstance(em, float) and em == em:
            figures.append(f"exact match {em:.0%}")
        if isinstance(kl, float) and kl == kl:
            figures.append(f"mean KL {kl:.3g}")
        status = row.get("quality.status") or ""
        lines.append(f"{_esc(kind)}: {_esc(', '.join(figures) or status)}"
                     + (f" · <b>{_esc(status)}</b>" if status in ("failed", "not checked") else ""))
        if row.get("quality.passed") is False:
            lines.append(f"<b>{_esc(LOSSY.format(kind=kind))}</b>: {_esc(row.get('quality.reason') or '')}")
    return "<br>".join(lines)


def pareto_chart(run: Run, sc: Scenario, spec: ChartSpec, chart_id: str) -> Chart | None:
    xc, yc = f"{sc.name}.{spec.x}", f"{sc.name}.{spec.y}"
    df = run.trials
    if xc not in df or yc not in df:
        return None
    # A duplicate reused an earlier trial's measurement: drawing it again would only stack two markers.
    drawable = df[df["duplicate_of"].isna()].copy()
    drawable[xc] = pd.to_numeric(drawable[xc], errors="coerce")
    drawable[yc] = pd.to_numeric(drawable[yc], errors="coerce")
    drawable = drawable[np.isfinite(drawable[xc]) & np.isfinite(drawable[yc])]
    pts = drawable[run.complete.loc[drawable.index]].copy()
    # Trials that measured this scenario and then failed (crash under load, too many errors): shown, faded.
    failed = drawable[~run.complete.loc[drawable.index]]
    if pts.empty and failed.empty:
        return None
    pts["_sla_met"] = run.sla_met(sc.name).loc[pts.index]
    dirty = run.contaminated(sc.name).loc[pts.index]
    pts["_feasible"] = run.feasible(sc.name).loc[pts.index]
    on_front = front(pts, xc, yc, spec.x_dir, spec.y_dir, only_valid_col="_feasible")
    dominated = pts[pts["_feasible"] & ~pts.index.isin(on_front.index)]
    invalid = pts[~pts["_sla_met"] & ~dirty]
    contaminated = pts[dirty]  # measured the engine warming up or replayed prompts: neither met nor missed
    lossy = pts[pts["_sla_met"] & ~pts["_feasible"] & ~dirty]  # the SLA met, the outputs changed too much
    params = run.param_columns

    def trace(rows: pd.DataFrame, **kw) -> go.Scatter:
        # customdata: [hover text, trial number]; the page reads the number to open the trial's drill-down.
        return go.Scatter(x=rows[xc].tolist(), y=rows[yc].tolist(),
                          customdata=[[hover_text(r, sc.name, params), int(r["number"])] for _, r in rows.iterrows()],
                          hovertemplate="%{customdata[0]}<extra></extra>", **kw)

    fig = go.Figure(_validate=False)  # built from known-good attributes; validation is most of the cost
    if not dominated.empty:
        fig.add_trace(trace(dominated, name=DOMINATED, mode="markers",
                            marker=dict(color=_GREY, size=9, opacity=0.35, line=dict(width=0))))
    if not invalid.empty:
        fig.add_trace(trace(invalid, name=INVALID, mode="markers",
                            marker=dict(color=_RED, size=10, symbol="x-thin-open", opacity=0.8,
                                        line=dict(width=2, color=_RED))))
    if not contaminated.empty:
        fig.add_trace(trace(contaminated, name=CONTAMINATED, mode="markers",
                            marker=dict(color=_ORANGE, size=11, symbol="circle-open", opacity=0.9,
                                        line=dict(width=2, color=_ORANGE, dash="dot"))))
    if not lossy.empty:
        fig.add_trace(trace(lossy, name=LOSSY.format(kind=run.quality_kind or "quality"), mode="markers",
                            marker=dict(color=_ORANGE, size=11, symbol="diamond-open", opacity=0.9,
                                        line=dict(width=2, color=_ORANGE))))
    if not failed.empty:
        fig.add_trace(trace(failed, name=FAILED, mode="markers",
                            marker=dict(color=_GREY, size=9, symbol="x", opacity=0.3)))
    fig.add_trace(trace(on_front, name=FRONT, mode="lines+markers",
                        line=dict(color=_BLUE, width=2),
                        marker=dict(color=_BLUE, size=11, line=dict(color="white", width=1))))
    base = pts[pts["is_baseline"].eq(True)]
    if not base.empty:
        fig.add_trace(trace(base, name=BASELINE, mode="markers+text", text=["baseline"] * len(base),
                            textposition="top center", textfont=dict(color="#7a5c00"),
                            marker=dict(color=_GOLD, size=18, symbol="star", line=dict(color="#5c4400", width=1.5))))

    limit = {"tpot_p99_ms": sc.tpot_limit_ms, "ttft_p99_ms": sc.ttft_limit_ms}.get(spec.x)
    x_log = _wants_log(drawable[xc].tolist() + ([limit] if limit else []))
    y_log = _wants_log(drawable[yc].tolist())
    if limit:
        fig.add_shape(type="line", xref="x", yref="paper", x0=limit, x1=limit, y0=0, y1=1,
                      line=dict(color=_RED, width=1.5, dash="dash"))
        fig.add_annotation(xref="x", yref="paper", x=math.log10(limit) if x_log else limit, y=1,
                           yanchor="bottom", showarrow=False, font=dict(color=_RED, size=11),
                           text=f"SLA {metric_label(spec.x)} {fmt_metric(limit, spec.x)}")
    # Below the plot, beside the legend: inside it the hint would sit exactly where the best points go.
    better = {("minimize", "maximize"): "↖", ("maximize", "maximize"): "↗",
              ("minimize", "minimize"): "↙", ("maximize", "minimize"): "↘"}[(spec.x_dir, spec.y_dir)]
    fig.add_annotation(xref="paper", yref="paper", x=1.0, y=-0.18, xanchor="right", yanchor="top",
                       showarrow=False, font=dict(color="#6b7280", size=11), text=f"better {better}")
    title = f"{metric_label(spec.y)} vs {metric_label(spec.x)}"
    if x_log:
        fig.update_xaxes(**_log_ticks(drawable[xc].tolist() + ([limit] if limit else [])))
    if y_log:
        fig.update_yaxes(**_log_ticks(drawable[yc].tolist()))
    fig.update_layout(
        height=430, margin=dict(l=70, r=20, t=48, b=90),
        title=dict(text=f"{_esc(sc.name)}: {title}", x=0.01, font=dict(size=14)),
        # throughput axes start at 0 (a linear axis of 388-394 tok/s would make noise look like differences);
        # latency axes zoom on the data, where the SLA line is
        xaxis=dict(title=dict(text=axis_title(spec.x)), type="log" if x_log else "linear", zeroline=False,
                   **({"rangemode": "tozero"} if _is_rate(spec.x) and not x_log else {})),
        yaxis=dict(title=dict(text=axis_title(spec.y)), type="log" if y_log else "linear",
                   **({"rangemode": "tozero"} if _is_rate(spec.y) and not y_log else {})),
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), hovermode="closest",
        hoverlabel=dict(align="left", bgcolor="white", font=dict(color="#1f2937", size=12)),
    )
    return Chart(id=chart_id, title=title, figure=_plain(fig),
                 front_numbers=[int(n) for n in on_front["number"]])


def level_chart(run: Run, sc: Scenario, chart_id: str) -> Chart | None:
    """Output tokens/s at each load level, one line per trial: where two lines cross, one configuration overtakes
    the other (speculative decoding against none: issue 20's crossover). A Pareto chart shows one level per
    trial; a sweep of fixed levels (``concurrency: [1, 8, 32, 128]``) holds each configuration's whole curve.
    Only for a scenario in which some trial measured two levels or more."""
    df = run.trials
    rows = df[df["duplicate_of"].isna() & run.complete] if "duplicate_of" in df else df[run.complete]
    curves = [(row, pts) for _, row in rows.iterrows()
              if len(pts := run.levels.get(int(row["number"]), {}).get(sc.name, [])) >= 2]
    if not curves:
        return None

    def params(row: pd.Series, cols: list[str]) -> str:
        return ", ".join(f"{c.removeprefix(PARAM)}={fmt_param(row.get(c))}" for c in cols
                         if fmt_param(row.get(c)) not in ("", "–", "nan", "None"))

    # the legend names a trial by what sets it apart from the others drawn; the hover box gives all of it
    varying = [c for c in run.param_columns
               if len({fmt_param(r.get(c)) for r, _ in curves if r.get("is_baseline") is not True}) > 1]
    by_rate = curves[0][1][0].unit == "qps"
    level_name = "req/s" if by_rate else "concurrency"
    symbols = {"valid": "circle", "invalid": "x-thin-open", "contaminated": "circle-open"}
    fig = go.Figure(_validate=False)
    for i, (row, points) in enumerate(curves):
        number, base = int(row["number"]), row.get("is_baseline") is True
        label = f"#{number} baseline" if base else f"#{number} {params(row, varying or run.param_columns)}".strip()
        head = f"#{number} baseline" if base else f"#{number} {params(row, run.param_columns)}"
        hover = [f"<b>{_esc(head)}</b><br>{level_name} {fmt_number(p.level)}: "
                 f"{fmt_metric(p.output_tokens_per_s, 'output_tokens_per_s')}"
                 + (f", p50 TPOT {fmt_metric(p.tpot_p50_ms, 'tpot_p50_ms')}" if p.tpot_p50_ms is not None else "")
                 + ("" if p.state == "valid" else f" — {p.state}") for p in points]
        fig.add_trace(go.Scatter(
            x=[p.level for p in points], y=[p.output_tokens_per_s for p in points], name=_esc(label),
            mode="lines+markers", customdata=[[h, number] for h in hover],
            hovertemplate="%{customdata[0]}<extra></extra>",
            line=dict(width=3 if base else 2, dash="solid" if base else ("dash", "dot", "dashdot")[i % 3]),
            marker=dict(size=9, symbol=[symbols[p.state] for p in points], line=dict(width=2))))
    levels = sorted({p.level for _, pts in curves for p in pts})
    log = _wants_log(levels) or (len(levels) >= 3 and levels[-1] / levels[0] >= 16)
    fig.update_layout(
        height=430, margin=dict(l=70, r=20, t=48, b=90),
        title=dict(text=f"{_esc(sc.name)}: output tokens/s at each load level", x=0.01, font=dict(size=14)),
        xaxis=dict(title=dict(text="offered load (req/s)" if by_rate else "concurrency (requests in flight)"),
                   type="log" if log else "linear", tickvals=levels, ticktext=[fmt_number(v) for v in levels]),
        yaxis=dict(title=dict(text=axis_title("output_tokens_per_s")), rangemode="tozero"),
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), hovermode="closest",
        hoverlabel=dict(align="left", bgcolor="white", font=dict(color="#1f2937", size=12)))
    return Chart(id=chart_id, title="output tokens/s at each load level", figure=_plain(fig), front_numbers=[])


def scenario_charts(run: Run, sc: Scenario, prefix: str) -> list[Chart]:
    out = []
    for i, spec in enumerate(chart_specs()):
        c = pareto_chart(run, sc, spec, f"{prefix}-{i}")
        if c is not None:
            out.append(c)
    lc = level_chart(run, sc, f"{prefix}-levels")
    if lc is not None:
        out.append(lc)
    return out


def importance_chart(imp: Importances, chart_id: str) -> Chart | None:
    if not imp.by_objective:
        return None
    params = list(dict.fromkeys(p for d in imp.by_objective.values() for p in d))
    # Most important overall at the top: plotly draws horizontal bar categories bottom-up.
    params.sort(key=lambda p: sum(d.get(p, 0.0) for d in imp.by_objective.values()))
    fig = go.Figure(_validate=False)  # built from known-good attributes; validation is most of the cost
    for k, (label, d) in enumerate(imp.by_objective.items()):
        fig.add_trace(go.Bar(y=[_esc(p) for p in params], x=[d.get(p, 0.0) for p in params], orientation="h",
                             name=_esc(label), marker_color=_BAR_COLORS[k % len(_BAR_COLORS)],
                             hovertemplate="%{y}: %{x:.0%}<extra>" + _esc(label) + "</extra>"))
    fig.update_layout(barmode="group",
                      height=120 + 28 * len(params) * len(imp.by_objective), margin=dict(l=160, r=20, t=30, b=40),
                      xaxis=dict(title=dict(text="importance (normalised per objective)"), tickformat=".0%",
                                 rangemode="tozero"),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    return Chart(id=chart_id, title="parameter importance", figure=_plain(fig), front_numbers=[])


def _is_rate(metric: str) -> bool:
    """A throughput (tokens or requests per second), as opposed to a latency."""
    return "_per_s" in metric


def _wants_log(values: list[float]) -> bool:
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) > _LOG_SPAN


def _log_ticks(values: list[float]) -> dict:
    """1-2-5 ticks labelled in full (200, 500, 1,000): Plotly's own log labels read "2", "5" for 2,000."""
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    lo, hi = math.floor(math.log10(min(pos))), math.ceil(math.log10(max(pos)))
    steps = (1, 2, 5) if hi - lo <= 4 else (1,)
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in steps]
    return dict(tickvals=ticks, ticktext=[fmt_number(t) for t in ticks])


def _plain(fig: go.Figure) -> dict:
    """The figure as JSON-ready Python data; NaN becomes None (a gap to Plotly, and valid JSON).

    The layout's template (``plotly_white``, ~7 kB) is left out: the page holds it once (:func:`template`)
    and puts it back in each figure before drawing."""
    d = _no_nan(fig.to_plotly_json())
    d.get("layout", {}).pop("template", None)
    return d


def template() -> dict:
    """The plotly_white template, once for the whole page."""
    return _no_nan(pio.templates["plotly_white"].to_plotly_json())


def _no_nan(o):
    if isinstance(o, float):
        return None if math.isnan(o) else o
    if isinstance(o, dict):
        return {k: _no_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_no_nan(v) for v in o]
    if isinstance(o, np.ndarray):
        return _no_nan(o.tolist())
    if isinstance(o, np.generic):
        return _no_nan(o.item())
    return o


__all__ = ["Chart", "ChartSpec", "chart_specs", "pareto_chart", "level_chart", "scenario_charts", "importance_chart",
           "hover_text", "template", "KEY_METRICS", "FRONT", "DOMINATED", "INVALID", "BASELINE", "FAILED",
           "CONTAMINATED", "LOSSY"]
