"""vLLM's /metrics as servetune reads them: the summary of a measured window in engine-neutral keys and
the audit's cumulative counters. The vLLM adapter and the sim (which exposes vLLM's metric names) share it.
"""
from __future__ import annotations

from servetune.optimizer.engines.prometheus import counter_delta, finite_rounded, labelled_key, ratio

# Metrics kept per label value (Engine.parse_metrics): vLLM counts accepted tokens per draft position.
VLLM_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
VLLM_SPLIT = {VLLM_PER_POSITION: "position"}
SPEC_POSITIONS_SHOWN = 16  # suffix decoding drafts up to 24 tokens; later positions are almost never accepted


def spec_per_position(before: dict[str, float], after: dict[str, float], drafts: float | None) -> dict[str, float]:
    """``spec_acceptance_pos{i}``: the share of drafts whose token i was accepted (vLLM's per-position rate,
    Δaccepted_per_pos[i] / Δnum_drafts)."""
    out: dict[str, float] = {}
    if not drafts:
        return out
    for i in range(SPEC_POSITIONS_SHOWN):
        key = labelled_key(VLLM_PER_POSITION, "position", str(i))
        if key not in after:
            break
        out[f"spec_acceptance_pos{i}"] = (after[key] - before.get(key, 0.0)) / drafts
    return out


def summarize_vllm_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """vLLM /metrics (also what the sim exposes) between two scrapes → engine-neutral keys.

    Counters become deltas, ratios are of deltas; gauges (kv_cache_usage, running, waiting) are the value at
    ``after``. Series with several labels (e.g. one per data-parallel engine) arrive summed. Speculative
    decoding: drafts (verifications carrying drafts), draft and accepted tokens, their ratio, the mean
    acceptance length (1 + accepted / drafts: the bonus token counts) and the per-position rates.
    """
    d = lambda n: counter_delta(before, after, n)  # noqa: E731
    drafts, draft_tokens, accepted = (d("vllm:spec_decode_num_drafts_total"),
                                      d("vllm:spec_decode_num_draft_tokens_total"),
                                      d("vllm:spec_decode_num_accepted_tokens_total"))
    mean_len = ratio(accepted, drafts)
    return finite_rounded({
        "spec_drafts": drafts,
        "spec_draft_tokens": draft_tokens,
        "spec_accepted_tokens": accepted,
        **spec_per_position(before, after, drafts),
        "kv_cache_usage": after.get("vllm:kv_cache_usage_perc"),
        "running": after.get("vllm:num_requests_running"),
        "waiting": after.get("vllm:num_requests_waiting"),
        "preemptions": d("vllm:num_preemptions_total"),
        "prefix_cache_hit_rate": ratio(d("vllm:prefix_cache_hits_total"), d("vllm:prefix_cache_queries_total")),
        "spec_acceptance_rate": ratio(accepted, draft_tokens),
        "spec_mean_acceptance_length": None if mean_len is None else 1.0 + mean_len,
        "prompt_tokens": d("vllm:prompt_tokens_total"),
        "generation_tokens": d("vllm:generation_tokens_total"),
        "requests_succeeded": d("vllm:request_success_total"),
    })


def vllm_audit_counters(m: dict[str, float]) -> dict[str, float]:
    """vLLM's (and the sim's) cumulative counters. ``vllm:request_success_total`` carries every finish
    reason (stop, length, abort, ...), summed here: the requests the engine finished."""
    names = {"prompt_tokens": "vllm:prompt_tokens_total", "generation_tokens": "vllm:generation_tokens_total",
             "prefix_cache_queries": "vllm:prefix_cache_queries_total",
             "prefix_cache_hits": "vllm:prefix_cache_hits_total", "preemptions": "vllm:num_preemptions_total",
             "requests_finished": "vllm:request_success_total", "kv_cache_usage": "vllm:kv_cache_usage_perc"}
    out = {k: m[n] for k, n in names.items() if n in m}
    if "vllm:num_requests_running" in m:
        out["in_flight"] = m["vllm:num_requests_running"] + m.get("vllm:num_requests_waiting", 0.0)
    return out
