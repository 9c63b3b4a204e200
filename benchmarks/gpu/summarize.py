"""Summarize GPU proof runs as Markdown: trials, engine start times, GPU duty cycle and use, how trials were
packed on the GPUs, the Pareto front, best valid vs baseline, and each trial's quality (or drift) verdict
against the baseline when the study checked outputs (docs/quality.md).

Usage: summarize.py STUDY_RUN_DIR [MORE_RUN_DIRS...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from servetune.optimizer.records import gpu_use
from servetune.optimizer.run_dir import trial_records
from servetune.optimizer.vs_baseline import compare


def fmt(v, nd=0):
    return "–" if v is None else f"{v:,.{nd}f}"


def pct(v):
    return "–" if v is None else f"{v:.1%}"


def levels(sc: dict) -> str:
    """Rates measured, ascending, ✓ where the SLA held (loadgen's validity verdict)."""
    return " ".join(f"{lv.get('qps', lv.get('concurrency')):.4g}{'✓' if lv.get('valid') else '✗'}"
                    for lv in sc.get("levels", [])) or "–"


def summarize(run: Path) -> str:
    ts = list(trial_records(run).values())
    lines = [f"## {run.name}: {len(ts)} trials", ""]
    lines.append("| # | state | params | GPU ids | ready s | loaded s | wall s | levels | max valid qps | out tok/s "
                 "| p99 TTFT ms | p99 TPOT ms | prefix hit | reason |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in ts:
        sc: dict[str, Any] = next(iter(t.get("scenarios", {}).values()), {})
        s = sc.get("summary", {})
        params = " ".join(f"{k}={v}" for k, v in t.get("params", {}).items()) or "(engine defaults)"
        if t.get("is_baseline"):
            params = "**baseline** " + params
        reason = (t.get("failure") or {}).get("kind", "")
        if t.get("failure"):
            reason += ": " + t["failure"]["reason"][:160]
        if t.get("duplicate_of") is not None:
            reason = f"same config as #{t['duplicate_of']} " + reason
        gpus = ",".join(map(str, t.get("gpu_ids") or [])) or "–"
        hit_rate = sc.get('metrics_delta', {}).get('prefix_cache_hit_rate')
        lines.append(f"| {t['number']} | {t['state']} | {params} | {gpus} | {fmt(t.get('ready_s'), 1)} "
                     f"| {fmt(t.get('loaded_s'), 1)} "
                     f"| {fmt(t.get('wall_s'), 1)} | {levels(sc)} | {fmt(s.get('max_valid_qps'), 1)} "
                     f"| {fmt(s.get('output_tokens_per_s'))} | {fmt(s.get('ttft_p99_ms'))} "
                     f"| {fmt(s.get('tpot_p99_ms'), 1)} "
                     f"| {pct(hit_rate)} | {reason.replace('|', '/')} |")
    launched = [t for t in ts if t.get("ready_s") is not None and t.get("duplicate_of") is None]
    if launched:
        starts = [t["ready_s"] for t in launched]
        first = min(launched, key=lambda t: t.get("started_at", ""))
        lines += ["", f"Engine start (launch → healthy): first {first['ready_s']:.0f} s (cold caches), "
                  f"others median {sorted(starts)[len(starts) // 2]:.0f} s, min {min(starts):.0f} s, "
                  f"max {max(starts):.0f} s."]
        loaded = sum(t.get("loaded_s", 0) * t.get("gpus", 1) for t in launched)
        wall = sum(t.get("wall_s", 0) * t.get("gpus", 1) for t in launched)
        lines.append(f"GPU duty cycle (GPU-seconds under measured load ÷ GPU-seconds of launched trials): "
                     f"{loaded / wall:.0%} ({loaded:,.0f} / {wall:,.0f} GPU-s).")
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    use = summary.get("gpu_use") or _gpu_use_from_records(run, ts)
    if use:
        lines.append(f"GPU use of the study (GPU-seconds held by trials ÷ GPUs × study span): {use['utilization']:.0%} "
                     f"({use['busy_gpu_s']:,.0f} / {use['available_gpu_s']:,.0f} GPU-s).")
    if "shared" in use:
        together = sorted({len(t.get("gpu_ids") or []) for t in launched})
        lines.append(f"Packing: at most {use['peak_gpus']} GPUs held at once by trials of {together} GPUs; "
                     + ("no two trials held a GPU at the same time." if not use["shared"] else
                        "**GPUs held by two trials at once: " + "; ".join(f"#{a} and #{b} on {ids}"
                                                                        for a, b, ids in use["shared"]) + "**."))
    lines += pareto_table(summary, {t["number"]: t for t in ts})
    lines += quality_table(ts, summary.get("quality") or {})
    # best vs baseline on the first scenario's output tok/s: a ratio only when both met the SLA, with brackets
    first_sc = next((name for t in ts for name in t.get("scenarios", {})), None)
    if first_sc and any(t.get("is_baseline") for t in ts):
        e = compare(ts, [(first_sc, "output_tokens_per_s", "maximize")])[0]
        lines += ["", f"Best vs baseline (same study, same host): {e['text']}."]
    return "\n".join(lines) + "\n"


def _gpu_use_from_records(run: Path, ts: list[dict]) -> dict:
    """A study stopped before its summary.json: GPU use from its trial records and its study's GPU count."""
    try:
        gpus = int(yaml.safe_load((run / "study.yaml").read_text())["hardware"]["gpus"])
    except (OSError, KeyError, TypeError, ValueError):
        return {}
    return gpu_use(ts, gpus)


def pareto_table(summary: dict, by_number: dict[int, dict]) -> list[str]:
    """The study's Pareto trials (summary.json) with their sharding and objective values; a trial that took
    another's result (same config) is that trial's row."""
    names = summary.get("objectives") or []
    front = [n for n in summary.get("pareto") or [] if by_number.get(n, {}).get("duplicate_of") is None]
    if not front:
        return []
    out = ["", "Pareto front (" + " vs ".join(names) + "):", "",
           "| # | GPUs | TP | PP | DP | quantization | max concurrency | " + " | ".join(names) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for n in front:
        t = by_number.get(n, {})
        p, obj = t.get("params", {}), t.get("objectives", {})
        out.append(f"| {n} | {t.get('gpus', '–')} | {p.get('tensor_parallel', 1)} | {p.get('pipeline_parallel', 1)} "
                   f"| {p.get('data_parallel', 1)} | {p.get('quantization', '–')} | {p.get('max_concurrency', '–')} | "
                   + " | ".join(fmt(obj.get(nm), 1) for nm in names) + " |")
    return out


def quality_table(ts: list[dict], quality: dict) -> list[str]:
    """Per trial: its outputs against the reference's (exact match, first divergence, KL, tasks) and the verdict."""
    judged = [t for t in ts if t.get("state") == "complete" and (t.get("quality") or {}).get("kind")]
    if not judged:
        return []
    kind = judged[0]["quality"]["kind"]
    limits = ", ".join(f"{k} {v:g}" for k, v in (quality.get("limits") or {}).items()) or "none"
    out = ["", f"{kind.capitalize()} against the baseline (limits: {limits}):", "",
           "| # | changes numerics | exact match | 1st divergence | mean KL | max KL | near-tie flips "
           "| tasks (95% CI) | verdict |",
           "|---|---|---|---|---|---|---|---|---|"]
    for t in judged:
        q = t["quality"]
        acc = q.get("accuracy")
        tasks = f"{acc['rate']:.0%} ({acc['ci95'][0]:.0%}–{acc['ci95'][1]:.0%})" if acc else "–"
        verdict = ("reference" if q.get("is_reference") else f"not checked: {q['unchecked']}" if q.get("unchecked")
                   else {True: "passed", False: "**failed**: " + "; ".join(q.get("reasons") or [])}.get(q.get("passed"),
                                                                                                  "no limits"))
        kl = "–" if q.get("kl_mean") is None else f"{q['kl_mean']:.4g}"
        klmax = "–" if q.get("kl_max") is None else f"{q['kl_max']:.4g}"
        em = "–" if q.get("exact_match") is None else f"{q['exact_match']:.1%}"
        ties = ("–" if q.get("divergences") is None else
                f"{q.get('near_tie_divergences', 0)} of {q['divergences']} (max regret {q.get('regret_max') or 0:.3g})")
        out.append(f"| {t['number']} | {', '.join(q.get('changes_numerics') or []) or '–'} | {em} "
                   f"| {fmt(q.get('first_divergence_mean'), 1)} | {kl} | {klmax} | {ties} | {tasks} "
                   f"| {verdict.replace('|', '/')} |")
    return out


if __name__ == "__main__":
    print("\n".join(summarize(Path(a)) for a in sys.argv[1:] if Path(a, "trials").is_dir()))
