"""The drill-down's figures of one trial: its load curve (every measured level) and its latency CDFs.

Every user string in them is escaped by :func:`charts._esc`. The CDFs are downsampled quantiles of
``requests_<scenario>.csv``, so a 100,000-request run costs the page a few hundred points per curve.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from servetune.reports.charts import _esc, _no_nan
from servetune.reports.model import Run
from servetune.reports.units import fmt_number, metric_label

log = logging.getLogger(__name__)

CDF_POINTS = 120
CDF_COLUMNS = [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency")]
_COLORS = ["#1f5fbf", "#c77d1a", "#2a9d8f", "#8e6cc2", "#d62728", "#6b7280"]


def present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def read_latencies(path: Path) -> dict[str, np.ndarray]:
    """Per-request TTFT/TPOT/E2E (ms) of the requests that succeeded outside warm-up; {} when unreadable."""
    try:
        head = pd.read_csv(path, nrows=0)
        cols = [c for c in ("ttft_ms", "tpot_ms", "e2e_ms", "status", "warmup", "scheduled_s", "first_byte_s",
                            "done_s", "scheduled", "first_byte", "done") if c in head.columns]
        df = pd.read_csv(path, usecols=cols)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        log.debug("%s: %s", path, e)
        return {}
    if "status" in df:
        df = df[df["status"].astype(str).eq("ok")]
    if "warmup" in df:
        df = df[~df["warmup"].astype(str).str.lower().eq("true")]
    # Records of an older shape carry timestamps only (seconds from the scenario's start).
    for ms, (a, b) in (("ttft_ms", ("scheduled", "first_byte")), ("e2e_ms", ("scheduled", "done"))):
        if ms not in df:
            for sa, sb in ((a + "_s", b + "_s"), (a, b)):
                if sa in df and sb in df:
                    df[ms] = (pd.to_numeric(df[sb], errors="coerce") - pd.to_numeric(df[sa], errors="coerce")) * 1e3
                    break
    out = {}
    for c, _ in CDF_COLUMNS:
        if c in df:
            v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                out[c] = v
    return out


def _cdf(values: np.ndarray) -> tuple[list[float], list[float]]:
    n = min(values.size, CDF_POINTS)
    p = np.linspace(0.0, 1.0, n) if n > 1 else np.array([1.0])
    x = np.quantile(values, p)
    return [float(v) for v in x], [float(v) for v in p]


def _row_of_plots(n: int, titles: list[str], gap: float) -> dict:
    """A layout of ``n`` side-by-side plots (plain JSON: building it through plotly.py's make_subplots and
    add_vline costs ~0.1 s a figure, which a static report pays once per trial)."""
    width = (1.0 - gap * (n - 1)) / n
    layout: dict[str, Any] = {"annotations": []}
    for j in range(n):
        lo = j * (width + gap)
        sfx = "" if j == 0 else str(j + 1)
        layout[f"xaxis{sfx}"] = {"domain": [lo, lo + width], "anchor": f"y{sfx}", "zeroline": False}
        layout[f"yaxis{sfx}"] = {"domain": [0.0, 1.0], "anchor": f"x{sfx}"}
        layout["annotations"].append({"text": titles[j], "x": lo + width / 2, "y": 1.0, "xref": "paper",
                                      "yref": "paper", "xanchor": "center", "yanchor": "bottom",
                                      "showarrow": False, "font": {"size": 12}})
    return layout


def cdf_figure(run: Run, trial_dir: Any, scenarios: list[str]) -> dict | None:
    if not isinstance(trial_dir, str):
        return None
    per = {}
    for name in scenarios:
        lat = read_latencies(Path(trial_dir) / f"requests_{name}.csv")
        if lat:
            per[name] = lat
    if not per:
        return None
    layout = _row_of_plots(3, [f"{t} (ms)" for _, t in CDF_COLUMNS], 0.07)
    data: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    limits = {s.name: s for s in run.scenarios}
    for i, (name, lat) in enumerate(per.items()):
        color = _COLORS[i % len(_COLORS)]
        for j, (col, title) in enumerate(CDF_COLUMNS):
            if col not in lat:
                continue
            x, y = _cdf(lat[col])
            sfx = "" if j == 0 else str(j + 1)
            data.append({"type": "scatter", "x": x, "y": y, "xaxis": f"x{sfx}", "yaxis": f"y{sfx}", "mode": "lines",
                         "name": _esc(name), "legendgroup": _esc(name), "showlegend": j == 0,
                         "line": {"color": color, "width": 2, "shape": "hv"},
                         "hovertemplate": f"{_esc(name)} · {title}: %{{x:,.1f}} ms<br>"
                                          "%{y:.0%} of requests<extra></extra>"})
        sc = limits.get(name)
        for sfx, limit in (("", sc.ttft_limit_ms if sc else None), ("2", sc.tpot_limit_ms if sc else None)):
            if limit and not any(sh["x0"] == limit and sh["xref"] == f"x{sfx}" for sh in shapes):
                shapes.append({"type": "line", "xref": f"x{sfx}", "yref": f"y{sfx} domain", "x0": limit, "x1": limit,
                               "y0": 0, "y1": 1, "line": {"color": "#d62728", "width": 1.2, "dash": "dash"}})
    for j, (col, _) in enumerate(CDF_COLUMNS):
        sfx = "" if j == 0 else str(j + 1)
        layout[f"yaxis{sfx}"].update(tickformat=".0%", range=[0, 1.02])
        vals = np.concatenate([lat[col] for lat in per.values() if col in lat] or [np.array([])])
        pos = vals[vals > 0]
        if pos.size >= 2 and pos.max() / pos.min() > 30:
            # decades only, labelled in full: a third of a chart has no room for Plotly's 2/5 minor labels
            lo, hi = math.floor(math.log10(pos.min())), math.ceil(math.log10(pos.max()))
            ticks = [10.0 ** e for e in range(lo, hi + 1)]
            layout[f"xaxis{sfx}"].update(type="log", tickvals=ticks, ticktext=[fmt_number(t) for t in ticks])
    layout.update(shapes=shapes, height=290, margin={"l": 50, "r": 15, "t": 36, "b": 40},
                  legend={"orientation": "h", "y": -0.22, "x": 0}, hovermode="closest",
                  hoverlabel={"align": "left", "bgcolor": "white"})
    return _no_nan({"data": data, "layout": layout})


def load_curve_figure(run: Run, row: pd.Series) -> dict | None:
    """Throughput and p99 latencies against the offered load, when the trial ran several load levels."""
    levels = []
    for sc in run.scenarios:
        if sc.qps and present(row.get(f"{sc.name}.output_tokens_per_s")):
            levels.append(sc)
    if len(levels) < 2:
        return None
    levels.sort(key=lambda s: s.qps or 0.0)
    qps = [float(s.qps or 0.0) for s in levels]  # every level here has a qps
    names = [_esc(s.name) for s in levels]

    def col(metric):
        return [float(row[f"{s.name}.{metric}"]) if present(row.get(f"{s.name}.{metric}")) else None for s in levels]

    layout = _row_of_plots(2, ["output tokens/s", "p99 latency (ms)"], 0.12)
    data = [{"type": "scatter", "x": qps, "y": col("output_tokens_per_s"), "text": names, "mode": "lines+markers",
             "name": "output tokens/s", "line": {"color": _COLORS[0]},
             "hovertemplate": "%{text}: %{x:g} q/s → %{y:,.0f} tok/s<extra></extra>"}]
    for k, m in enumerate(("ttft_p99_ms", "tpot_p99_ms")):
        data.append({"type": "scatter", "x": qps, "y": col(m), "text": names, "mode": "lines+markers",
                     "xaxis": "x2", "yaxis": "y2", "name": metric_label(m), "line": {"color": _COLORS[k + 1]},
                     "hovertemplate": "%{text}: %{x:g} q/s → %{y:,.1f} ms<extra>" + metric_label(m) + "</extra>"})
    for sfx in ("", "2"):
        layout[f"xaxis{sfx}"]["title"] = {"text": "offered load (queries/s)"}
    layout["yaxis"]["rangemode"] = "tozero"
    layout.update(height=290, margin={"l": 55, "r": 15, "t": 36, "b": 50},
                  legend={"orientation": "h", "y": -0.3, "x": 0})
    return _no_nan({"data": data, "layout": layout})


# -- the whole panel ----------------------------------------------------------------------------------------
