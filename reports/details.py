"""One trial, in depth: what the drill-down panel shows (config diff, launch command, verdicts, curves, logs).

:func:`trial_detail` returns JSON-ready data. Strings are raw (the page inserts them as text, never as
HTML); the only pseudo-HTML is in the Plotly figures, built here with every user string escaped by
:func:`charts._esc`. Its figures (load curve, latency CDFs) are :mod:`~servetune.reports.detail_figures`.
"""
from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from servetune.loadgen.scenario_kinds import level_key
from servetune.optimizer.quality import TIE_MARGIN, load_eval
from servetune.optimizer.run_dir import read_record
from servetune.reports.detail_figures import cdf_figure, load_curve_figure, present, read_latencies
from servetune.reports.model import DELTA, PARAM, Run, dict_at
from servetune.reports.roofline import EXPLANATION, estimate
from servetune.reports.units import fmt_metric, fmt_number, fmt_param, metric_label

log = logging.getLogger(__name__)

LOG_LINES = 40
LOG_CHARS = 8000
DETAIL_METRICS = ["output_tokens_per_s", "output_tokens_per_s_per_gpu", "tokens_per_s_per_user", "request_per_s",
                  "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms", "e2e_p99_ms",
                  "concurrency_mean", "error_rate", "requests_ok", "duration_s"]
PER_TRIAL_FLAGS = {"--port"}


def read_trial_json(trial_dir: Any) -> dict[str, Any]:
    """The raw trial.json (argv, per-scenario metric deltas), or {} while it is missing or half written."""
    if not isinstance(trial_dir, str):
        return {}
    return read_record(trial_dir) or {}


def log_tail(trial_dir: Any, lines: int = LOG_LINES, chars: int = LOG_CHARS) -> str:
    if not isinstance(trial_dir, str):
        return ""
    try:
        with open(Path(trial_dir) / "engine.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))  # logs can be gigabytes; the cause is at the end
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


# -- config against the baseline ----------------------------------------------------------------------------

def config_diff(run: Run, row: pd.Series) -> list[dict[str, Any]]:
    base = run.baseline()
    out = []
    for c in run.param_columns:
        v = row.get(c)
        b = base.get(c) if base is not None else None
        if not present(v) and not present(b):
            continue
        same = fmt_param(v) == fmt_param(b)
        out.append({"name": c[len(PARAM):], "value": fmt_param(v),
                    "baseline": fmt_param(b) if base is not None else "",
                    "differs": base is not None and not same})
    return out


def _flag_pairs(argv: list[str]) -> set[tuple[str, str]]:
    pairs, i = set(), 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.add((a, argv[i + 1]))
            i += 2
        else:
            pairs.add((a, ""))
            i += 1
    return pairs


def command_parts(argv: list[str], base_argv: list[str] | None) -> list[dict[str, Any]]:
    """The argv as shell words, each marked when the baseline's command lacks it (flag and value together)."""
    base = _flag_pairs(base_argv) if base_argv else None
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            words, pair = [a, argv[i + 1]], (a, argv[i + 1])
            i += 2
        else:
            words, pair = [a], (a, "")
            i += 1
        # The port is picked per trial: a different one is no difference in configuration.
        changed = base is not None and pair not in base and a not in PER_TRIAL_FLAGS
        out.append({"text": " ".join(shlex.quote(w) for w in words), "changed": changed})
    return out


# -- curves -------------------------------------------------------------------------------------------------

def _metric_rows(row: pd.Series, scenario: str) -> list[dict[str, str]]:
    out = []
    for m in DETAIL_METRICS:
        v = row.get(f"{scenario}.{m}")
        if present(v):
            text = fmt_metric(v, m) if m != "concurrency_mean" else fmt_number(v)
            out.append({"name": "mean concurrency" if m == "concurrency_mean" else metric_label(m), "value": text})
    return out


AUDIT_HEAD = ["level", "audit", "prompt tokens server / client", "output tokens server / client",
              "prefix-cache hits", "KV cache peak", "preemptions", "engine log", "why"]


def _tokens(server: dict[str, Any], client: dict[str, Any], key: str) -> str:
    got, sent = server.get(key), client.get(key)
    return f"{fmt_number(got) if present(got) else '—'} / {fmt_number(sent) if present(sent) else '—'}"


def _audit_row(label: str, a: dict[str, Any], status: str) -> list[str]:
    server = dict_at(a, "server")
    client = dict_at(a, "client")
    hits, prompt = server.get("prefix_cache_hits"), server.get("prompt_tokens")
    hit_text = f"{hits / prompt:.1%}" if present(hits) and prompt else "—"
    peak = server.get("kv_cache_usage_peak")
    log = a.get("log")
    if isinstance(log, dict):
        counts = log.get("counts") or {}
        log_text = ", ".join(f"{n} {k}" for k, n in counts.items()) or "clean"
    else:
        log_text = "not read"
    why = "; ".join(str(x) for x in (a.get("reasons") or []) + (a.get("notes") or []))
    return [label, status, _tokens(server, client, "prompt_tokens"), _tokens(server, client, "generation_tokens"),
            hit_text, f"{peak:.0%}" if present(peak) else "—",
            fmt_number(server.get("preemptions")) if present(server.get("preemptions")) else "—", log_text, why]


def audit_table(raw_sc: Any) -> dict[str, Any] | None:
    """The engine-side audit of each level of one scenario (loadgen.audit), first runs a re-run replaced
    included, for the drill-down; None when the trial recorded none."""
    if not isinstance(raw_sc, dict):
        return None
    levels: list[Any] = raw_sc["levels"] if isinstance(raw_sc.get("levels"), list) else [raw_sc]
    rows, flags = [], []
    for lvl in levels:
        a = lvl.get("audit") if isinstance(lvl, dict) else None
        if not isinstance(a, dict):
            continue
        settings = dict_at(lvl, "settings")
        rate = lvl.get("qps", lvl.get("concurrency", settings.get("qps") or settings.get("concurrency")))
        by_rate = "concurrency" not in lvl and level_key(settings.get("kind")) != "concurrency"
        label = (f"{fmt_number(rate)} q/s" if by_rate else f"concurrency {fmt_number(rate)}") if present(rate) \
            else str(settings.get("kind") or "run")
        first = a.get("rerun_of") if isinstance(a.get("rerun_of"), dict) else None
        if first and isinstance(first.get("audit"), dict):
            rows.append(_audit_row(label + " (first run)", first["audit"], "failed: re-run after more warm-up"))
            flags.append("replaced")
        status = ("contaminated" if a.get("contaminated") else "passed" if a.get("passed")
                  else "failed (the level is invalid anyway)" if a.get("verdict_stands") else "failed")
        rows.append(_audit_row(label + (" (re-run)" if first else ""), a, status))
        flags.append("contaminated" if a.get("contaminated") else "")
    if not rows:
        return None
    return {"head": AUDIT_HEAD, "rows": rows, "flags": flags, "contaminated": bool(raw_sc.get("contaminated"))}


def warmup_summary(raw: dict[str, Any]) -> dict[str, Any] | None:
    """What the launch's warm-up did (optimizer.warmup), for the drill-down."""
    w = raw.get("warmup")
    if not isinstance(w, dict) or not isinstance(w.get("rounds"), list):
        return None
    rows = [[str(r.get("round")), fmt_number(r.get("seconds")), fmt_number(r.get("requests")),
             fmt_number(r.get("compile_lines")), str((r.get("lines") or [""])[0])]
            for r in w["rounds"] if isinstance(r, dict)]
    text = (f"{len(rows)} round{'s' if len(rows) != 1 else ''} of a concurrency ramp up to "
            f"{fmt_number(w.get('max_concurrency'))}, {fmt_number(w.get('requests'))} requests in "
            f"{fmt_number(w.get('seconds'))} s, {fmt_number(w.get('compile_lines'))} compile lines; stopped at "
            f"{w.get('stopped_because') or '—'}")
    return {"text": text, "clean": bool(w.get("clean")), "head": ["round", "seconds", "requests", "compile lines",
                                                                   "first compile line"], "rows": rows}


def _verdict(row: pd.Series, scenario: str) -> dict[str, Any]:
    sla, valid = row.get(f"{scenario}.sla_met"), row.get(f"{scenario}.valid")
    if row.get(f"{scenario}.contaminated") is True:
        return {"sla": "contaminated", "sla_reason": "the engine-side audit failed twice: no verdict on the "
                "configuration", "valid": "not valid",
                "invalid_reasons": str(row.get(f"{scenario}.invalid_reasons") or ""),
                "notes": str(row.get(f"{scenario}.notes") or "")}
    return {"sla": "met" if sla is True else "missed" if sla is False else "not measured",
            "sla_reason": str(row.get(f"{scenario}.sla_reason") or ""),
            "valid": "valid" if valid is True else "not valid" if valid is False else "no verdict",
            "invalid_reasons": str(row.get(f"{scenario}.invalid_reasons") or ""),
            "notes": str(row.get(f"{scenario}.notes") or "")}


def _deltas(row: pd.Series, raw: dict[str, Any], scenarios: list[str]) -> dict[str, Any]:
    names = [c[len(DELTA):] for c in row.index if c.startswith(DELTA) and present(row.get(c))]
    per: dict[str, dict[str, Any]] = {}
    for s in scenarios:
        sc = (raw.get("scenarios") or {}).get(s) if isinstance(raw.get("scenarios"), dict) else None
        d = sc.get("metrics_delta") if isinstance(sc, dict) else None
        if isinstance(d, dict):
            per[s] = d
            names += [k for k in d if k not in names]
    cols = [s for s in scenarios if s in per]
    rows = []
    for n in dict.fromkeys(names):
        total = row.get(f"{DELTA}{n}")
        rows.append({"name": str(n), "total": fmt_number(total) if present(total) else "—",
                     "per_scenario": [fmt_number(per[s].get(n)) if isinstance(per[s].get(n), (int, float))
                                      else "—" for s in cols]})
    return {"scenarios": cols, "rows": rows}


QUALITY_EXAMPLES = 5  # continuations that differ from the baseline's, shown side by side


def _measured_dir(run: Run, number: Any) -> str | None:
    """The trial directory holding the measurement (and eval.json) of trial ``number``."""
    rows = (run.trials[run.trials["number"].eq(number)] if isinstance(number, (int, np.integer))
            else run.trials.iloc[0:0])
    if rows.empty:
        return None
    r = rows.iloc[0]
    if present(r.get("duplicate_of")):
        return _measured_dir(run, int(r["duplicate_of"]))
    return r.get("trial_dir") if isinstance(r.get("trial_dir"), str) else None


def quality_detail(run: Run, row: pd.Series, raw: dict[str, Any]) -> dict[str, Any] | None:
    """The trial's quality (or drift) verdict, its figures, and a few continuations that differ."""
    q = raw.get("quality") if isinstance(raw.get("quality"), dict) else None
    if not q or not q.get("kind"):
        return None
    kind = str(q["kind"])
    figures = []
    if q.get("exact_match") is not None:
        figures.append(("exact match", f"{q['exact_match']:.1%} of {q.get('compared')} prompts"))
    if q.get("first_divergence_mean") is not None:
        figures.append(("mean first divergence", f"token {q['first_divergence_mean']:.1f}"))
    if q.get("kl_mean") is not None:
        figures.append(("mean KL (top-K)", f"{q['kl_mean']:.4g} nats over {q.get('kl_positions')} tokens"))
    if q.get("kl_max") is not None:
        figures.append(("max KL", f"{q['kl_max']:.4g} nats"))
    if q.get("divergences"):
        margin = q.get("tie_margin", TIE_MARGIN)
        figures.append(("first differences", f"{q['divergences']}, {q.get('near_tie_divergences', 0)} of them "
                                             f"near-ties (baseline's margin ≤ {margin:g} nats); "
                                             f"largest regret {q.get('regret_max') or 0:.3g} nats; beyond a "
                                             f"near-tie: {q.get('decisive_divergence', 0):.1%} of prompts"))
    for key, label in (("accuracy", "task accuracy"), ("accuracy_reference", "baseline task accuracy")):
        a = q.get(key)
        if isinstance(a, dict):
            figures.append((label, f"{a['rate']:.0%} ({a['correct']}/{a['n']}; 95% CI {a['ci95'][0]:.0%}–"
                                   f"{a['ci95'][1]:.0%})"))
    if q.get("changes_numerics"):
        figures.append(("changes numerics", ", ".join(map(str, q["changes_numerics"]))))
    if q.get("limits"):
        figures.append(("limits", ", ".join(f"{k} {v:g}" for k, v in q["limits"].items())))
    if q.get("seconds") is not None:
        figures.append(("evaluation", f"{q.get('items')} prompts in {q['seconds']:.1f} s"
                                      + (f", {q['errors']} unanswered" if q.get("errors") else "")))
    examples = []
    mine = load_eval(_measured_dir(run, int(row["number"])) or "") if q.get("reference") is not None else None
    ref = load_eval(_measured_dir(run, q["reference"]) or "") if mine is not None else None
    if mine and ref:
        by_id = {a["id"]: a for a in mine["items"]}
        for a in ref["items"]:
            b = by_id.get(a.get("id"))
            if (a.get("kind") != "compare" or not b or "tokens" not in a or "tokens" not in b
                    or a["tokens"] == b["tokens"]):
                continue
            at = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                      min(len(a["tokens"]), len(b["tokens"])))
            examples.append({"id": str(a["id"]), "prompt": str(a.get("prompt", "")), "baseline": str(a.get("text", "")),
                             "trial": str(b.get("text", "")), "at": at})
            if len(examples) >= QUALITY_EXAMPLES:
                break
    status = str(row.get("quality.status") or "")
    return {"kind": kind, "status": status,
            "title": "Quality against the baseline" if kind == "quality" else
                     "Numerical drift against the baseline (random weights: not a measure of quality)",
            "reason": str(row.get("quality.reason") or ""),
            "reference": q.get("reference"), "is_reference": bool(q.get("is_reference")),
            "figures": [{"name": k, "value": v} for k, v in figures], "examples": examples}


SPEC_KEYS = [("spec_drafts", "drafts"), ("spec_draft_tokens", "draft tokens"), ("spec_accepted_tokens", "accepted"),
             ("spec_acceptance_rate", "acceptance rate"), ("spec_mean_acceptance_length", "mean accepted length")]


def speculation(raw: dict[str, Any]) -> dict[str, Any]:
    """The engine's speculative-decoding counters per scenario and load level (or for the whole scenario when
    it ran one level): drafts, draft and accepted tokens, acceptance rate, mean acceptance length and the
    per-position acceptance rates. Empty when the trial drafted nothing."""
    rows: list[dict[str, Any]] = []
    positions = 0
    scenarios = dict_at(raw, "scenarios")
    for name, sc in scenarios.items():
        if not isinstance(sc, dict):
            continue
        levels = [lv for lv in sc.get("levels") or []
                  if isinstance(lv, dict) and isinstance(lv.get("metrics_delta"), dict)]
        units = [(_level_name(lv),
                  lv.get("output_tokens_per_s") or (lv.get("summary") or {}).get("output_tokens_per_s"),
                  lv["metrics_delta"]) for lv in levels]
        if not units and isinstance(sc.get("metrics_delta"), dict):
            units = [("all", (sc.get("summary") or {}).get("output_tokens_per_s"), sc["metrics_delta"])]
        for level, tok_s, d in units:
            if not d.get("spec_drafts") and not d.get("spec_draft_tokens"):
                continue
            pos = [d[f"spec_acceptance_pos{i}"] for i in range(64) if f"spec_acceptance_pos{i}" in d]
            positions = max(positions, len(pos))
            rows.append({"scenario": str(name), "level": level,
                         "output_tokens_per_s": fmt_metric(tok_s, "output_tokens_per_s") if present(tok_s) else "—",
                         "values": [_spec_fmt(k, d.get(k)) for k, _ in SPEC_KEYS],
                         "per_position": [f"{v:.0%}" for v in pos]})
    return {"columns": [label for _, label in SPEC_KEYS], "positions": positions, "rows": rows}


def _level_name(level: dict[str, Any]) -> str:
    for key, unit in (("concurrency", "concurrency "), ("qps", "")):
        if present(level.get(key)):
            return f"{unit}{fmt_number(level[key])}{' queries/s' if key == 'qps' else ''}"
    return "—"


def _spec_fmt(key: str, v: Any) -> str:
    if not isinstance(v, (int, float)) or not present(v):
        return "—"
    if key == "spec_acceptance_rate":
        return f"{v:.1%}"
    if key == "spec_mean_acceptance_length":
        return f"{v:.2f}"
    return fmt_number(v)


def trial_detail(run: Run, number: int) -> dict[str, Any] | None:
    """Everything the drill-down shows for trial ``number`` (None when the run has no such trial)."""
    match = run.trials[run.trials["number"].eq(number)] if not run.trials.empty else run.trials
    if match.empty:
        return None
    row = match.iloc[0]
    raw = read_trial_json(row.get("trial_dir"))
    base = run.baseline()
    base_raw = read_trial_json(base.get("trial_dir")) if base is not None else {}
    argv = [str(a) for a in raw.get("argv") or []] if isinstance(raw.get("argv"), list) else []
    base_argv = [str(a) for a in base_raw.get("argv") or []] if isinstance(base_raw.get("argv"), list) else None
    is_base = bool(row.get("is_baseline"))
    measured = [s.name for s in run.scenarios if any(k.startswith(f"{s.name}.") and present(row.get(k))
                                                    for k in (f"{s.name}.output_tokens_per_s",
                                                              f"{s.name}.ttft_p99_ms", f"{s.name}.sla_met"))]
    scenarios = []
    for sc in run.scenarios:
        if sc.name not in measured:
            continue
        rf = estimate(run, row, sc.name)
        raw_sc = (raw.get("scenarios") or {}).get(sc.name) if isinstance(raw.get("scenarios"), dict) else None
        scenarios.append({"name": sc.name, "kind": sc.kind,
                          "qps": fmt_number(sc.qps) if sc.qps else "",
                          "verdict": _verdict(row, sc.name), "metrics": _metric_rows(row, sc.name),
                          "audit": audit_table(raw_sc),
                          "roofline": {**rf.to_dict(),
                                       "text": f"{rf.fraction:.0%}" if rf.fraction is not None else "—",
                                       "bound": fmt_metric(rf.bound_tok_s, "output_tokens_per_s"),
                                       "bound_at_max": fmt_metric(rf.bound_at_max_tok_s, "output_tokens_per_s"),
                                       "measured": fmt_metric(rf.measured_tok_s, "output_tokens_per_s"),
                                       "concurrency_text": fmt_number(rf.concurrency)}})
    failure = None
    if present(row.get("failure_kind")) or present(row.get("failure_reason")):
        failure = {"kind": str(row.get("failure_kind") or row.get("state")),
                   "reason": str(row.get("failure_reason") or "no reason recorded")}
    facts = [("engine", " ".join(str(x) for x in (row.get("engine"), row.get("engine_version")) if present(x))),
             ("GPUs", f"{fmt_number(row.get('gpus'))}" + (f" (ids {row['gpu_ids']})" if present(row.get("gpu_ids"))
                                                           and row.get("gpu_ids") else "")),
             *([("node", str(row["node"]))] if present(row.get("node")) else []),
             ("started", str(row.get("started_at") or "—")),
             ("time to ready", fmt_metric(row.get("ready_s"), "ready_s")),
             ("wall time", fmt_metric(row.get("wall_s"), "wall_s"))]
    if present(row.get("duplicate_of")):
        facts.append(("measurement", f"reused from trial #{int(row['duplicate_of'])} (same configuration)"))
    return {
        "number": int(row["number"]), "state": str(row.get("state")), "is_baseline": is_base,
        "baseline_number": int(base["number"]) if base is not None else None,
        "facts": [{"name": k, "value": v} for k, v in facts],
        "failure": failure,
        "config": config_diff(run, row),
        "argv": argv,
        "command": shlex.join(argv) if argv else "",
        "command_parts": command_parts(argv, None if is_base else base_argv),
        "scenarios": scenarios,
        "quality": quality_detail(run, row, raw),
        "roofline_note": EXPLANATION,
        "deltas": _deltas(row, raw, [s.name for s in run.scenarios]),
        "warmup": warmup_summary(raw),
        "speculation": speculation(raw),
        "log_tail": log_tail(row.get("trial_dir")),
        "figures": {k: v for k, v in (("load", load_curve_figure(run, row)),
                                      ("cdf", cdf_figure(run, row.get("trial_dir"), measured))) if v},
    }


def all_details(run: Run) -> dict[str, dict[str, Any]]:
    out = {}
    for n in run.trials["number"].tolist() if not run.trials.empty else []:
        d = trial_detail(run, int(n))
        if d is not None:
            out[str(int(n))] = d
    return out


__all__ = ["trial_detail", "all_details", "speculation", "config_diff", "command_parts", "read_latencies", "cdf_figure",
           "load_curve_figure", "log_tail", "read_trial_json", "audit_table", "warmup_summary"]
