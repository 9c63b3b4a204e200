"""Best trial against the baseline, per objective: a ratio only when both sides have an SLA-valid measurement.

"Best" is the best trial a user may act on: SLA met and quality limits met. A faster trial that failed the
quality limits is named beside it (what it measured and why it is out), never as the best: on 2026-12-05 an fp8
trial whose greedy answers matched the baseline's 11 % of the time was printed as "best ... 1.04× baseline".

A baseline that "missed the SLA" has no capacity figure, so best ÷ baseline would divide by a number that
means nothing (or by zero). The comparison says why instead: "the baseline missed the SLA even at the floor
0.25 req/s". With a max-QPS search each side also carries its bracket (highest valid rate, lowest invalid
one), so a reader sees how sharp both ends of the ratio are. Works on trial records (``trial.json`` dicts);
``summary.json``, the console and ``benchmarks/gpu/summarize.py`` print what :func:`compare` returns.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from servetune.optimizer import quality


def _value(rec: dict[str, Any], scenario: str, metric: str) -> float | None:
    v = (rec.get("scenarios", {}).get(scenario, {}).get("summary") or {}).get(metric)
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _contaminated(rec: dict[str, Any], scenario: str) -> bool:
    """The scenario's reported measurement failed its audit twice (the record's flag, set by the lifecycle as
    the teller and the report read it): neither met nor missed."""
    return bool((rec.get("scenarios", {}).get(scenario) or {}).get("contaminated"))


def bracket(rec: dict[str, Any], scenario: str) -> list[float | None] | None:
    """[highest valid rate, lowest invalid rate] of a max-QPS search, or None for a fixed-rate scenario."""
    summ = rec.get("scenarios", {}).get(scenario, {}).get("summary") or {}
    if "max_qps_stopped_because" not in summ:
        return None
    return [summ.get("max_qps_bracket_low"), summ.get("max_qps_bracket_high")]


def missed_reason(rec: dict[str, Any], scenario: str, who: str = "the baseline") -> str:
    """Why ``rec`` has no SLA-valid measurement of ``scenario``, in words."""
    if rec.get("state") != "complete":
        f = rec.get("failure") or {}
        return f"{who} (trial #{rec.get('number')}) did not complete: {f.get('kind') or rec.get('state')}" + (
            f" ({f['reason']})" if f.get("reason") else "")
    sc = rec.get("scenarios", {}).get(scenario)
    if not sc:
        return f"{who} (trial #{rec.get('number')}) did not measure {scenario}"
    floor = (sc.get("summary") or {}).get("max_qps_floor")
    if floor is not None:
        return f"{who} missed the SLA even at the floor {floor:g} req/s"
    return f"{who} missed the SLA at the rates measured"


def compare(records: Iterable[dict[str, Any]], objectives: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Per objective (scenario, metric, direction): the best SLA-valid trial, the baseline, and their ratio
    (best ÷ baseline) or ``why_not``. A trial that took another's result (same config) is skipped."""
    recs = [r for r in records if r.get("duplicate_of") is None]
    base = next((r for r in recs if r.get("is_baseline")), None)
    out = []
    for scenario, metric, direction in objectives:
        entry: dict[str, Any] = {"objective": f"{scenario}.{metric}", "direction": direction, "ratio": None}
        measured = [(v, r) for r in recs if r.get("state") == "complete"
                    and r.get("scenarios", {}).get(scenario, {}).get("sla_met") is not False
                    and not _contaminated(r, scenario)
                    and (v := _value(r, scenario, metric)) is not None]
        valid = [(v, r) for v, r in measured if not quality.failed(r.get("quality"))]
        pick = max if direction == "maximize" else min
        if valid:
            v, best = pick(valid, key=lambda x: x[0])
            entry.update(best_trial=best.get("number"), best=v, best_bracket=bracket(best, scenario))
        out_of_limits = [(v, r) for v, r in measured if quality.failed(r.get("quality"))]
        if out_of_limits:
            v, r = pick(out_of_limits, key=lambda x: x[0])
            beats = not valid or (v > entry["best"] if direction == "maximize" else v < entry["best"])
            if beats:  # only a trial that would have been "best" is worth naming
                entry.update(quality_failed_trial=r.get("number"), quality_failed=v,
                             quality_reasons=list((r.get("quality") or {}).get("reasons") or []))
        if base is not None:
            entry.update(baseline_trial=base.get("number"), baseline=_value(base, scenario, metric),
                         baseline_bracket=bracket(base, scenario))
        if not valid:
            dirty = sum(1 for r in recs if r.get("state") == "complete" and _contaminated(r, scenario))
            entry["why_not"] = ("no trial met both the SLA and the quality limits" if out_of_limits
                                else f"no trial met the SLA; {dirty} measured only contaminated levels (audit "
                                     "failed twice)" if dirty else "no trial met the SLA")
        elif base is None:
            entry["why_not"] = "no baseline trial"
        elif _contaminated(base, scenario):
            entry["why_not"] = (f"the baseline's {scenario} (trial #{base.get('number')}) is contaminated: its audit "
                                "failed twice, so it measured no capacity")
        elif base.get("state") != "complete" or base.get("scenarios", {}).get(scenario, {}).get("sla_met") is False \
                or scenario not in base.get("scenarios", {}):
            entry["why_not"] = missed_reason(base, scenario)
        elif not entry.get("baseline"):
            entry["why_not"] = f"the baseline (trial #{base.get('number')}) has no {metric} to divide by"
        else:
            entry["ratio"] = entry["best"] / entry["baseline"]
        entry["text"] = describe(entry)
        out.append(entry)
    return out


def _side(value: float | None, trial: Any, brk: list[float | None] | None) -> str:
    text = f"{value:,.4g} (trial #{trial}" if value is not None else f"(trial #{trial}"
    if brk is not None:
        low, high = brk
        text += (f", valid up to {low:.4g} req/s, invalid at {high:.4g}" if low is not None and high is not None
                 else f", valid at {low:.4g} req/s and above (the search's hi)" if low is not None
                 else ", no valid rate")
    return text + ")"


def describe(entry: dict[str, Any]) -> str:
    """One line: "server.output_tokens_per_s: best 5,123 (trial #4, ...) vs baseline ... → 1.51× baseline"."""
    parts = [f"{entry['objective']}:"]
    if entry.get("best_trial") is not None:
        parts.append("best " + _side(entry.get("best"), entry["best_trial"], entry.get("best_bracket")))
    if entry.get("baseline_trial") is not None:
        parts.append("vs baseline " + _side(entry.get("baseline"), entry["baseline_trial"],
                                            entry.get("baseline_bracket")))
    if entry.get("ratio") is not None:
        parts.append(f"→ {entry['ratio']:.2f}× baseline")
    else:
        parts.append(f"→ no ratio: {entry['why_not']}")
    text = " ".join(parts)
    if entry.get("quality_failed_trial") is not None:
        why = "; ".join(entry.get("quality_reasons") or []) or "see its quality verdict"
        text += (f"; trial #{entry['quality_failed_trial']} measured {entry['quality_failed']:,.4g} but failed the "
                 f"quality limits ({why})")
    return text
