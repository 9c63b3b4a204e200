"""Where speculative decoding stops paying, from a finished study whose trials swept fixed concurrency levels
(search_spaces/examples/*specdec*.yaml): per scenario and level, each configuration's output tokens/s, p50
TPOT and the engine's acceptance, measured on the same launch as the levels around it; then, per speculative
configuration, the lowest level from which it is slower than the best configuration without speculation at
every level up (the crossover).

Usage: spec_crossover.py RUN_DIR [MORE_RUN_DIRS...]   (Markdown on stdout)
"""
from __future__ import annotations

import sys
from pathlib import Path

from servetune.optimizer.run_dir import trial_records

OFF = (None, "none", "off", False)
SPEC = ("speculative_method", "speculative_tokens", "speculative_lookup_min", "speculative_lookup_max")


def is_off(params: dict) -> bool:
    return params.get("speculative_method") in OFF


def label(params: dict, varying: list[str]) -> str:
    """off / "ngram k=4 n=2..5", then the other parameters that differ between the study's trials."""
    if is_off(params):
        parts = ["off"]
    else:
        parts = [str(params["speculative_method"]), f"k={params.get('speculative_tokens', '?')}"]
        if params.get("speculative_lookup_min") is not None or params.get("speculative_lookup_max") is not None:
            parts.append(f"n={params.get('speculative_lookup_min', '?')}..{params.get('speculative_lookup_max', '?')}")
    parts += [f"{k}={params[k]}" for k in varying if k in params]
    return " ".join(parts)


def table(run: Path) -> dict[str, dict[str, dict[float, dict]]]:
    """{scenario: {config label: {level: level record}}} of the completed, launched trials."""
    trials = [t for t in trial_records(run).values()
              if t.get("state") == "complete" and t.get("duplicate_of") is None]
    keys = {k for t in trials for k in (t.get("params") or {}) if k not in SPEC}
    varying = sorted(k for k in keys if len({str((t.get("params") or {}).get(k)) for t in trials}) > 1)
    out: dict[str, dict[str, dict[float, dict]]] = {}
    for t in trials:
        name = label(t.get("params") or {}, varying)
        for scenario, sc in (t.get("scenarios") or {}).items():
            for lv in sc.get("levels") or []:
                level = lv.get("concurrency", lv.get("qps"))
                if level is not None:
                    out.setdefault(scenario, {}).setdefault(name, {})[float(level)] = lv
    return out


def rate(level: dict) -> float:
    return (level.get("summary") or level).get("output_tokens_per_s") or 0.0


def crossover(off: dict[float, float], on: dict[float, dict]) -> float | None:
    """The lowest level from which speculation is slower (output tokens/s) than ``off`` (level -> tokens/s,
    the best configuration without speculation) at every level measured."""
    levels = sorted(set(off) & set(on))
    worse = [lv for lv in levels if rate(on[lv]) < off[lv]]
    for i, lv in enumerate(levels):
        if all(x in worse for x in levels[i:]):
            return lv
    return None


def verdict(off: dict[float, float], on: dict[float, dict]) -> str:
    """Where a speculative configuration is faster and slower than the best one without, and its crossover
    (speculation may lose at low levels too: 2026-12-06, SmolLM2 on vLLM 0.26)."""
    both = sorted(set(off) & set(on))
    faster = [lv for lv in both if rate(on[lv]) > off[lv]]
    slower = [lv for lv in both if rate(on[lv]) < off[lv]]
    levels = ", ".join
    if not faster:
        return f"slower than the best without speculation at every level ({levels(f'{v:g}' for v in both)})"
    text = f"faster at {levels(f'{v:g}' for v in faster)}"
    if slower:
        text += f"; slower at {levels(f'{v:g}' for v in slower)}"
    x = crossover(off, on)
    if x is not None:
        return text + f"; slower from level {x:g} up (the crossover)"
    return text + "; not slower at the highest level both measured"


def render(run: Path) -> str:
    lines = [f"## {run.name}", ""]
    for scenario, configs in table(run).items():
        levels = sorted({lv for c in configs.values() for lv in c})
        names = sorted(configs, key=lambda n: (not n.startswith("off"), n))
        lines += [f"### scenario {scenario}: output tok/s · p50 TPOT ms · acceptance (mean accepted length)", "",
                  "| level | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for lv in levels:
            cells = []
            for n in names:
                rec = configs[n].get(lv)
                if rec is None:
                    cells.append("–")
                    continue
                s = rec.get("summary") or rec
                d = rec.get("metrics_delta") or {}
                acc = d.get("spec_acceptance_rate")
                cell = f"{s.get('output_tokens_per_s', 0):,.0f} · {s.get('tpot_p50_ms', float('nan')):.2f}"
                if acc is not None:
                    cell += f" · {acc:.0%} ({d.get('spec_mean_acceptance_length', float('nan')):.2f})"
                cells.append(cell)
            lines.append(f"| {lv:g} | " + " | ".join(cells) + " |")
        lines.append("")
        offs = [n for n in names if n.startswith("off")]
        best_off = {lv: max(rate(configs[n][lv]) for n in offs if lv in configs[n])
                    for lv in levels if any(lv in configs[n] for n in offs)}
        if best_off:
            for n in names[len(offs):]:
                lines.append(f"- {n}: {verdict(best_off, configs[n])}")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(render(Path(a)) for a in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
