"""Judge the load levels of finished trials again, under the validity rules of this checkout.

A trial directory keeps every level's requests (``requests_<scenario>_qps<rate>.csv``) beside its
``trial.json``; this reads them back (loadgen.scenarios.read_records), runs loadgen.validity.verdict with
each level's own settings, and prints per trial: each level before → now (with the reason when it changed),
the highest level valid now, its output tok/s, and best ÷ baseline; then each trial's highest valid level
before and now as output tok/s/GPU and tok/s/user, with the Pareto front of those two.

Usage: python benchmarks/gpu/rejudge.py TRIALS_DIR [TRIALS_DIR ...] [--scenario server] [--min-keep-up 0.7]
(TRIALS_DIR: a run's ``trials/`` folder, one subfolder per trial.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from servetune.loadgen.metrics import summarize
from servetune.loadgen.scenarios import ScenarioSettings, read_records
from servetune.loadgen.validity import DEFAULT_MIN_KEEP_UP, verdict
from servetune.reports.pareto import pareto_mask

SETTING_NAMES = set(ScenarioSettings.__dataclass_fields__)


def rejudge_trial(trial_dir: Path, scenario: str, min_keep_up: float | None) -> dict:
    record = json.loads((trial_dir / "trial.json").read_text())
    result = (record.get("scenarios") or {}).get(scenario)
    if not result or not result.get("levels"):
        return {"number": record["number"], "baseline": record.get("is_baseline", False), "levels": []}
    levels = []
    for level in result["levels"]:
        rate = level["settings"]["qps"]
        path = trial_dir / f"requests_{scenario}_qps{rate:.4g}.csv"
        if not path.exists():
            continue
        settings = ScenarioSettings(**{**{k: v for k, v in level["settings"].items() if k in SETTING_NAMES},
                                       "min_keep_up": min_keep_up})
        records = read_records(path)  # summarize and verdict leave the warm-ups out
        summary = summarize(records, level["duration_s"], settings.ttft_limit_ms, settings.tpot_limit_ms,
                            settings.num_gpus)
        v = verdict(records, settings, summary=summary)
        levels.append({"qps": rate, "was": level["valid"], "now": v.valid, "reasons": v.reasons,
                       "out_tok_s": summary["output_tokens_per_s"], "keep_up": summary["keep_up_ratio"],
                       "out_tok_s_gpu": summary["output_tokens_per_s_per_gpu"],
                       "tok_s_user": summary["tokens_per_s_per_user"],
                       "e2e_p50_s": summary["e2e_p50_ms"] / 1000})
    levels.sort(key=lambda x: x["qps"])
    return {"number": record["number"], "baseline": record.get("is_baseline", False), "levels": levels,
            "params": record.get("params", {}), "gpus": record.get("gpus")}


def front(judged: list[dict], key: str) -> list[str]:
    """Per trial, its highest level valid (before or now) as tok/s/GPU and tok/s/user; ★ on the Pareto front."""
    rows = [(t, b) for t in judged if (b := best_level(t["levels"], key))]
    if not rows:
        return []
    mask = pareto_mask(np.array([[b["out_tok_s_gpu"], b["tok_s_user"]] for _, b in rows]), ["maximize", "maximize"])
    out = ["| # | GPUs | params | req/s | out tok/s/GPU | tok/s/user | Pareto |", "|---|---|---|---|---|---|---|"]
    for (t, b), on in sorted(zip(rows, mask), key=lambda x: -x[0][1]["out_tok_s_gpu"]):
        params = " ".join(f"{k}={v}" for k, v in t["params"].items())
        out.append(f"| {t['number']} | {t['gpus'] or '–'} | {params} | {b['qps']:.4g} | {b['out_tok_s_gpu']:,.0f} "
                   f"| {b['tok_s_user']:.1f} | {'★' if on else ''} |")
    return out


def best_level(levels: list[dict], key: str) -> dict | None:
    valid = [x for x in levels if x[key]]
    return max(valid, key=lambda x: x["qps"]) if valid else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trials", nargs="+", type=Path)
    ap.add_argument("--scenario", default="server")
    ap.add_argument("--min-keep-up", type=float, default=DEFAULT_MIN_KEEP_UP)
    args = ap.parse_args(argv)
    for trials in args.trials:
        print(f"## {trials}\n")
        print("| # | level req/s | e2e p50 s | keep-up | before | now | why not valid now |")
        print("|---|---|---|---|---|---|---|")
        judged = [rejudge_trial(d, args.scenario, args.min_keep_up) for d in sorted(trials.iterdir()) if d.is_dir()]
        for t in judged:
            for x in t["levels"]:
                mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
                why = "; ".join(x["reasons"]) if x["was"] != x["now"] else ""
                print(f"| {t['number']}{' (baseline)' if t['baseline'] else ''} | {x['qps']:.4g} | "
                      f"{x['e2e_p50_s']:.1f} | {x['keep_up']:.2f} | {mark(x['was'])} | {mark(x['now'])} | {why} |")
        print()
        for key, label in (("was", "as measured"), ("now", "judged again")):
            rows = [(t, best_level(t["levels"], key)) for t in judged]
            base = next((b for t, b in rows if t["baseline"] and b), None)
            best = max((b for _, b in rows if b), key=lambda b: b["out_tok_s"], default=None)
            if base and best:
                print(f"- {label}: best valid {best['out_tok_s']:,.0f} out tok/s at {best['qps']:.4g} req/s vs "
                      f"baseline {base['out_tok_s']:,.0f} at {base['qps']:.4g} → "
                      f"{best['out_tok_s'] / base['out_tok_s']:.2f}×")
            else:
                print(f"- {label}: {'no valid baseline level' if not base else 'no valid level'}")
        print()
        for key, label in (("was", "as measured"), ("now", "judged again")):
            table = front(judged, key)
            if table:
                print(f"Highest valid level per trial, {label}:\n")
                print("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
