"""The quality guardrail: a trial's greedy answers compared with its engine's baseline on the same prompts.

Every trial of a study with a ``quality:`` section runs the evaluation set after its load levels, on the same
launch (:mod:`servetune.optimizer.quality_run`). The driver then compares its answers with those of the
baseline trial of the same engine (the engine's defaults: the checkpoint's own precision) and records a
verdict in ``trial.json`` under ``quality`` (when that baseline failed or was rejected, the first completed trial
that runs the baseline's numerics stands in for it). Figures, over the evaluation set's items:

- ``exact_match``: the share of items whose greedy continuation (the generated tokens) equals the baseline's.
- ``first_divergence_mean``: the mean, over items, of the position of the first generated token that differs
  from the baseline's (0-based, so it counts the leading tokens that agree); an identical continuation counts
  its full length, one that stops early where the other goes on counts the shorter length.
- ``kl_mean`` / ``kl_max``: per-token KL(baseline ‖ trial) in nats, averaged over every position where both
  were conditioned on the same text: each item's positions up to and including its first divergence.
  Each side reports only its top K logprobs, so each distribution is coarsened to the union of both top-K
  lists plus one bucket for the rest of the vocabulary. A probability one side did not report is set to an
  even share of that side's missing mass (1 − the sum of its top K), divided among the tokens it did not
  report plus the rest bucket, and never above its own K-th probability; the rest bucket takes what remains.
  With exact values, coarsening can only lower a KL divergence, so the figure errs low when much mass lies
  outside the top K; with K = 10 on a peaked model the missing mass is small.
- ``divergences`` / ``near_tie_divergences`` / ``decisive_divergence`` / ``regret_max``: where an item's
  continuation differs, the *regret* is how far below its own pick the baseline ranked the trial's token at the
  first difference (its top-1 logprob minus its logprob of that token, nats). A regret within ``tie_margin``
  is a near-tie flip: the baseline itself was all but indifferent there, and a different summation order
  (another kernel, a speculative verify pass) is enough to flip it; the continuations then differ in full
  although no answer was changed on purpose. ``decisive_divergence`` is the share of compared items whose
  first difference is not a near-tie: a regret above the margin, a token outside the baseline's top K, no
  logprob to tell, or no answer at all.
- ``accuracy`` (when the study gives ``tasks``): correct answers over all task prompts with a Wilson 95 %
  interval, for the trial and for the baseline; ``accuracy_drop`` = baseline − trial.

A trial misses the study's limits (``min_exact_match``, ``min_first_divergence``, ``max_mean_kl``,
``max_decisive_divergence``, ``max_accuracy_drop``) and is infeasible, like a missed SLA: its constraint
``quality`` is above 0. An evaluation that failed, or that has no baseline evaluation to compare with,
cannot show that a limit holds: it is infeasible too when limits are set. On random weights
(``load_format: dummy``) the same figures measure numerical drift, not quality: the verdict says
``kind: drift``.

``NUMERICS`` is the one list of settings that can change a model's outputs: the parameters flagged
``numerics: true`` in ``search_spaces/parameters.yaml``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from servetune.optimizer import evalset
from servetune.optimizer.catalog import parameters
from servetune.optimizer.quality_run import EVAL_FILE

NUMERICS: tuple[str, ...] = tuple(n for n, p in parameters().items() if p.get("numerics"))
LIMITS = ("min_exact_match", "min_first_divergence", "max_mean_kl", "max_decisive_divergence", "max_accuracy_drop")
TIE_MARGIN = 0.5  # nats: 4 bf16 steps of a logit between 16 and 32, where an LLM's top logits usually lie
# A verdict's keys that the study summary carries per trial (optimizer/summary.py); the JSON export adds the
# context to read them by (optimizer/export.py).
SUMMARY_KEYS = ("passed", "reference", "exact_match", "first_divergence_mean", "kl_mean", "kl_max", "divergences",
                "near_tie_divergences", "decisive_divergence", "regret_max", "accuracy_drop", "changes_numerics",
                "unchecked", "reasons")
_Q_FLOOR = 1e-12  # a trial probability of 0 where the baseline has mass: KL is large, not infinite


def failed(verdict: Mapping[str, Any] | None) -> bool:
    """A trial whose verdict missed the study's limits: never a "best" to recommend (no verdict: not failed)."""
    return (verdict or {}).get("passed") is False


def numerics_changes(params: Mapping[str, Any], reference: Mapping[str, Any]) -> list[str]:
    """``name=value`` for each numerics-changing parameter whose value differs from ``reference``'s
    (both should hold the engine's defaults under what was set)."""
    return [f"{n}={params.get(n)}" for n in NUMERICS if str(params.get(n)) != str(reference.get(n))]


# -- the figures ----------------------------------------------------------------------------------------------

def _coarsen(top: Mapping[str, float], support: list[str]) -> list[float]:
    """Probabilities over ``support`` plus a rest bucket, from one side's top-K logprobs (see module doc)."""
    known = {t: math.exp(v) for t, v in top.items()}
    mass = min(1.0, sum(known.values()))
    tail = 1.0 - mass
    missing = sum(1 for t in support if t not in known)
    share = min(min(known.values()), tail / (missing + 1)) if missing and known else 0.0
    probs = [known.get(t, share) for t in support]
    return probs + [max(0.0, tail - share * missing)]


def topk_kl(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """KL(P ‖ Q) in nats between two top-K logprob maps ({token: logprob}), coarsened as the module says."""
    support = list(dict.fromkeys([*p, *q]))
    pp, qq = _coarsen(p, support), _coarsen(q, support)
    return max(0.0, sum(a * (math.log(a) - math.log(max(b, _Q_FLOOR))) for a, b in zip(pp, qq) if a > 0))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95 % for z = 1.96)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def divergence_regret(ref_top: Mapping[str, float] | None, token: str) -> float | None:
    """How far below its own pick the reference ranked ``token`` (nats, >= 0); None when its top-K logprobs
    are missing or do not hold the token (then it is at least the top-K spread: not a near-tie)."""
    if not ref_top or token not in ref_top:
        return None
    return max(0.0, max(ref_top.values()) - ref_top[token])


def compare(reference: list[dict[str, Any]], trial: list[dict[str, Any]],
            tie_margin: float = TIE_MARGIN) -> dict[str, Any]:
    """The figures of ``trial``'s answers against ``reference``'s (items of kind "compare", matched by id).
    Items the baseline could not answer are left out; items the trial could not answer count as diverging at
    their first token."""
    mine = {a["id"]: a for a in trial if a.get("kind") == "compare"}
    exact, firsts, kls, unanswered = 0, [], [], 0
    regrets: list[float | None] = []  # one per item whose continuation differs from the reference's
    for ref in reference:
        if ref.get("kind") != "compare" or ref.get("error") or "tokens" not in ref:
            continue
        got = mine.get(ref["id"])
        if got is None or got.get("error") or "tokens" not in got:
            unanswered += 1
            firsts.append(0)
            continue
        a, b = ref["tokens"], got["tokens"]
        d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        exact += a == b
        firsts.append(d)
        ta, tb = ref.get("top_logprobs") or [], got.get("top_logprobs") or []
        for j in range(min(d + 1, len(a), len(b), len(ta), len(tb))):
            if ta[j] and tb[j]:
                kls.append(topk_kl(ta[j], tb[j]))
        if a != b:  # a continuation that stops where the other goes on has no token to rank: not a near-tie
            regrets.append(divergence_regret(ta[d] if d < len(ta) else None, b[d]) if d < min(len(a), len(b))
                           else None)
    n = len(firsts)
    if n == 0:
        return {"compared": 0}
    known = [r for r in regrets if r is not None]
    ties = sum(1 for r in known if r <= tie_margin)
    return {"compared": n, "unanswered": unanswered, "exact_match": round(exact / n, 4),
            "first_divergence_mean": round(sum(firsts) / n, 3),
            "kl_mean": round(sum(kls) / len(kls), 6) if kls else None,
            "kl_max": round(max(kls), 6) if kls else None, "kl_positions": len(kls),
            "divergences": len(regrets), "near_tie_divergences": ties, "tie_margin": tie_margin,
            "decisive_divergence": round((len(regrets) - ties + unanswered) / n, 4),
            "regret_max": round(max(known), 4) if known else None}


def accuracy(answers: list[dict[str, Any]], match: str) -> dict[str, Any] | None:
    """Task accuracy with its Wilson 95 % interval; an unanswered task counts as wrong."""
    tasks = [a for a in answers if a.get("kind") == "task"]
    if not tasks:
        return None
    k = sum(1 for a in tasks if not a.get("error") and evalset.correct(a.get("text") or "", a.get("answers") or (),
                                                                      match))
    lo, hi = wilson(k, len(tasks))
    return {"correct": k, "n": len(tasks), "rate": round(k / len(tasks), 4), "ci95": [round(lo, 4), round(hi, 4)]}


# -- files ------------------------------------------------------------------------------------------------------

def load_eval(trial_dir: str | Path) -> dict[str, Any] | None:
    try:
        d = json.loads((Path(trial_dir) / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("items"), list) else None


def reference_trial(records: Mapping[int, Mapping[str, Any]], engine: str,
                    same_numerics: Callable[[Mapping[str, Any]], bool] | None = None) -> tuple[int, int] | None:
    """(reference trial, trial that measured it) for ``engine``: its first complete baseline with an evaluation;
    when there is none (the baseline failed or was rejected), the first such trial for which ``same_numerics``
    holds (it runs the baseline's numerics: e.g. the defaults on more GPUs)."""
    usable = {n: r for n, r in records.items() if r.get("engine") == engine and r.get("state") == "complete"
              and (r.get("quality") or {}).get("file") and not (r.get("quality") or {}).get("error")}
    pick = next((n for n in sorted(usable) if usable[n].get("is_baseline")), None)
    if pick is None and same_numerics is not None:
        pick = next((n for n in sorted(usable) if same_numerics(usable[n])), None)
    if pick is None:
        return None
    r = usable[pick]
    return pick, (r["duplicate_of"] if r.get("duplicate_of") is not None else pick)


# -- the gate -------------------------------------------------------------------------------------------------

class QualityGate:
    """What a study's ``quality:`` section asks of every trial, and the verdict on each."""

    def __init__(self, spec: Any, *, drift: bool, base_dir: str | None = None):
        self.spec = spec
        self.kind = "drift" if drift else "quality"
        items = evalset.load(spec.eval_set, "compare", spec.max_tokens, base_dir)
        if spec.tasks:
            tasks = evalset.load(spec.tasks, "task", spec.max_tokens, base_dir)
            clash = {i.id for i in items} & {t.id for t in tasks}
            if clash:
                raise evalset.EvalSetError(f"{spec.tasks}:1: ids also used by the evaluation set: "
                                           f"{', '.join(sorted(clash)[:3])}")
            items += tasks
        self.items = items
        self.fingerprint = evalset.fingerprint(items, {"logprobs": spec.logprobs})

    def limits(self) -> dict[str, float]:
        return {k: float(getattr(self.spec, k)) for k in LIMITS if getattr(self.spec, k) is not None}

    @property
    def constrains(self) -> bool:
        return bool(self.limits())

    def trial_settings(self) -> dict[str, Any]:
        """What a trial needs to run the evaluation (travels in the TrialPlan)."""
        s = self.spec
        return {"items": [i.to_dict() for i in self.items], "fingerprint": self.fingerprint,
                "logprobs": s.logprobs, "concurrency": s.concurrency, "timeout_s": s.timeout_s,
                "request_timeout_s": s.request_timeout_s}

    def judge(self, record: Mapping[str, Any] | None, own: dict[str, Any] | None,
              reference: tuple[int, dict[str, Any] | None] | None, changes: list[str],
              is_reference: bool = False) -> dict[str, Any]:
        """The verdict to store as ``trial.json``'s ``quality``: ``record`` is what the trial kept of its
        evaluation, ``own`` its eval.json, ``reference`` (baseline trial number, its eval.json);
        ``is_reference``: this is the baseline itself (compared with itself, it shows the set was answered)."""
        v: dict[str, Any] = {k: x for k, x in (record or {}).items()
                             if k in ("file", "fingerprint", "items", "errors", "first_error", "seconds", "error")}
        v.update(kind=self.kind, changes_numerics=list(changes), limits=self.limits())
        if is_reference:
            v["is_reference"] = True
        reasons: list[str] = []
        if v.get("error") or not record:
            reasons.append(v.get("error") or "no evaluation was run")
        elif own is None:
            reasons.append(f"its {EVAL_FILE} is missing or unreadable")
        elif reference is None or reference[1] is None:
            reasons.append("no baseline evaluation of this engine to compare with")
        elif reference[1].get("fingerprint") != own.get("fingerprint"):
            reasons.append("the baseline was evaluated on other prompts or settings (the eval set changed?)")
        else:
            v["reference"] = reference[0]
            figures = compare(reference[1]["items"], own["items"], self.spec.tie_margin)
            if not figures.get("compared"):
                reasons.append("no evaluation prompt was answered by both this trial and the baseline")
            v.update(figures)
            acc, base_acc = accuracy(own["items"], self.spec.task_match), accuracy(reference[1]["items"],
                                                                                   self.spec.task_match)
            if acc is not None:
                v["accuracy"], v["accuracy_reference"] = acc, base_acc
                if base_acc is not None:
                    v["accuracy_drop"] = round(base_acc["rate"] - acc["rate"], 4)
        if reasons:
            v["unchecked"] = "; ".join(reasons)
        v["constraint"], missed = self._violation(v)
        v["passed"] = (v["constraint"] <= 0) if self.constrains else None
        if missed:
            v["reasons"] = missed
        return v

    def _violation(self, v: Mapping[str, Any]) -> tuple[float, list[str]]:
        """The constraint value (≤ 0: every limit met) and a sentence per missed limit."""
        lim = self.limits()
        if not lim:
            return 0.0, []
        if v.get("unchecked"):
            return 1.0, [f"not checked: {v['unchecked']}"]
        worst, why = -math.inf, []

        def check(c: float, text: str) -> None:
            nonlocal worst
            worst = max(worst, c)
            if c > 0:
                why.append(text)

        if "min_exact_match" in lim:
            m, L = v.get("exact_match", 0.0), lim["min_exact_match"]
            check((L - m) / max(L, 1e-9), f"exact match {m:.0%} < {L:.0%}")
        if "min_first_divergence" in lim:
            m, L = v.get("first_divergence_mean", 0.0), lim["min_first_divergence"]
            check((L - m) / max(L, 1e-9), f"mean first divergence at token {m:.1f} < {L:g}")
        if "max_mean_kl" in lim:
            m, L = v.get("kl_mean"), lim["max_mean_kl"]
            if m is None:
                check(1.0, "no KL: no position with logprobs on both sides")
            else:
                check(min(1e6, (m - L) / max(L, 1e-9)), f"mean KL {m:.4g} > {L:g} nats")
        if "max_decisive_divergence" in lim:
            m, L = v.get("decisive_divergence", 1.0), lim["max_decisive_divergence"]
            check((m - L) / max(L, 0.01), f"{m:.0%} of answers diverge beyond a near-tie (regret > "
                                          f"{v.get('tie_margin', TIE_MARGIN):g} nats) > {L:.0%}")
        if "max_accuracy_drop" in lim:
            d, L = v.get("accuracy_drop"), lim["max_accuracy_drop"]
            if d is None:
                check(1.0, "no task accuracy to compare (tasks: unanswered by the baseline?)")
            else:
                a, b = v["accuracy"]["rate"], v["accuracy_reference"]["rate"]
                check((d - L) / max(L, 0.01), f"task accuracy {b:.0%} → {a:.0%}: a drop of {d * 100:.1f} points "
                                              f"> {L * 100:g}")
        return (worst if math.isfinite(worst) else 0.0), why


def describe(q: Mapping[str, Any] | None) -> str:
    """One line for the console and the export: the verdict and its figures."""
    if not q:
        return "not checked"
    kind = q.get("kind", "quality")
    if q.get("unchecked"):
        return f"{kind} not checked: {q['unchecked']}"
    parts = []
    if q.get("exact_match") is not None:
        parts.append(f"exact match {q['exact_match']:.0%}")
    if q.get("first_divergence_mean") is not None:
        parts.append(f"1st divergence {q['first_divergence_mean']:.1f}")
    if q.get("kl_mean") is not None:
        parts.append(f"KL {q['kl_mean']:.3g}")
    if q.get("divergences"):
        ties = q.get("near_tie_divergences") or 0
        parts.append(f"{ties} of {q['divergences']} divergences near-ties" if ties < q["divergences"]
                     else f"every divergence a near-tie (regret ≤ {q.get('regret_max') or 0:.3g} nats)")
    if q.get("accuracy"):
        parts.append(f"tasks {q['accuracy']['rate']:.0%}")
    verdict = {True: "ok", False: "FAILED", None: "measured"}[q.get("passed")]
    ref = " (the reference)" if q.get("is_reference") else ""
    text = f"{kind} {verdict}{ref}: " + ", ".join(parts)
    if q.get("reasons") and q.get("passed") is False:
        text += " — " + "; ".join(q["reasons"])
    return text
