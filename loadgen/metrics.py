"""Per-request latencies and the run summary, computed the MLPerf LoadGen way.

Definitions (milliseconds unless the name says otherwise; times are seconds since the scenario's t0):

- **TTFT** = first_byte − scheduled. The origin is the *scheduled* send time, so any client-side delay
  (a late issue loop, a full connection pool) is charged to the measurement instead of hidden
  (coordinated omission cannot shrink latency).
- **TPOT** (per request) = (done − first_byte) / (output_tokens − 1); requests with ≤ 1 output token have
  no TPOT (LoadGen rejects them too).
- **ITL** = per-token gaps: each content chunk's gap to the previous chunk, spread evenly over the tokens
  it carried. A chunk of k tokens contributes k samples of gap/k, so multi-token chunks (speculative
  decoding) neither vanish nor look like one slow token. The first chunk contributes none.
- **E2E** = done − scheduled.
- **Percentiles** are nearest-rank on the sorted values, ``sorted[int(n·p)]`` clipped to the last index,
  exactly as LoadGen's ``results.cc`` (no interpolation: numpy's default gives different p99s at small n).
- **Throughput** windows run from t0 to the last completion of a measured request (LoadGen's
  ``max_latency`` for Offline, ``final_query_all_samples_done_time`` for Server): a failed request still
  ends when the load generator learned its outcome, so a server that times out requests cannot look fast.
  Tokens are counted for successful requests only.
- **tokens_per_s_per_user** = mean over requests of 1000/TPOT_ms, each request's own decode rate;
  ``tokens_per_s_per_user_at_tpot_p90`` = 1000/TPOT-p90 (MLPerf Endpoints' tps_per_user).
- ``ttft_from_send_*`` / ``e2e_from_send_*``: the same from the actual send (the origin vLLM, SGLang,
  GuideLLM and AIPerf use); the difference to the scheduled-origin figures is the schedule lag.
- ``chunk_gap_*``: raw gaps between token-bearing chunks, before spreading over their tokens (AIPerf ICL).
- **Goodput** (DistServe/vLLM): requests that succeeded and met every given limit, per second of the
  window; ``goodput_output_tokens_per_s`` counts their output tokens; ``good_request_fraction`` keeps
  failed requests in the denominator.
- **keep_up_ratio**: departures ÷ arrivals over the second half of the schedule, from the growth of the
  number of requests in the system (see :func:`keep_up`); ``in_system_at_half`` / ``_at_end`` beside it.

Only successful, non-warmup records enter latency and token statistics; failures are counted by kind.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from servetune.loadgen.records import RequestRecord

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
# Always reported, so tables built from many runs have the same columns; http_<code> kinds join when seen.
ERROR_KINDS = ("timeout", "dropped", "malformed", "connect", "stream_error", "client_error", "cancelled")
NAN = float("nan")


def nearest_rank(values: Iterable[float], p: float) -> float:
    """MLPerf LoadGen's percentile: ``sorted(values)[int(n·p)]``, index clipped to ``n − 1``; NaN if empty."""
    ordered = sorted(values)
    if not ordered:
        return NAN
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {p}")
    return ordered[min(int(len(ordered) * p), len(ordered) - 1)]


def ttft_ms(r: RequestRecord) -> float | None:
    if r.first_byte is None:
        return None
    return (r.first_byte - r.scheduled) * 1000.0


def tpot_ms(r: RequestRecord) -> float | None:
    if r.first_byte is None or r.done is None or r.output_tokens <= 1:
        return None
    return (r.done - r.first_byte) * 1000.0 / (r.output_tokens - 1)


def e2e_ms(r: RequestRecord) -> float | None:
    if r.done is None:
        return None
    return (r.done - r.scheduled) * 1000.0


def ttft_from_send_ms(r: RequestRecord) -> float | None:
    """TTFT from the actual send (what vLLM/SGLang/GuideLLM/AIPerf report): excludes the schedule lag."""
    if r.first_byte is None or r.sent is None:
        return None
    return (r.first_byte - r.sent) * 1000.0


def e2e_from_send_ms(r: RequestRecord) -> float | None:
    if r.done is None or r.sent is None:
        return None
    return (r.done - r.sent) * 1000.0


def chunk_gaps_ms(r: RequestRecord) -> list[float]:
    """Raw gaps between consecutive token-bearing chunks (AIPerf's ICL, vLLM's per-chunk "ITL")."""
    ts = [c.t for c in r.chunks if c.tokens > 0]
    return [(b - a) * 1000.0 for a, b in zip(ts, ts[1:])]


def schedule_lag_ms(r: RequestRecord) -> float | None:
    if r.sent is None:
        return None
    return (r.sent - r.scheduled) * 1000.0


def itl_ms(r: RequestRecord) -> list[float]:
    """Per-token inter-token latencies of one request (see the module docstring)."""
    chunks = [c for c in r.chunks if c.tokens > 0]  # a token-less event is not a token's arrival
    gaps: list[float] = []
    for prev, cur in zip(chunks, chunks[1:]):
        gaps.extend([(cur.t - prev.t) * 1000.0 / cur.tokens] * cur.tokens)
    return gaps


def _stats(prefix: str, values: Sequence[float], out: dict[str, float]) -> None:
    ordered = sorted(values)
    out[f"{prefix}_mean_ms"] = math.fsum(ordered) / len(ordered) if ordered else NAN
    for name, p in PERCENTILES:
        out[f"{prefix}_{name}_ms"] = nearest_rank(ordered, p)
    out[f"{prefix}_max_ms"] = ordered[-1] if ordered else NAN


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _peak_overlap(spans: Sequence[tuple[float, float]]) -> int:
    # Ends sort before starts at the same instant: back-to-back requests are not concurrent.
    events = sorted([(s, 1) for s, _ in spans] + [(d, -1) for _, d in spans], key=lambda e: (e[0], e[1]))
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _over(value_ms: float | None, limit_ms: float) -> bool:
    """Over the limit, or not measured (no first token)."""
    return value_ms is None or value_ms > limit_ms


def meets_limits(r: RequestRecord, ttft_limit_ms: float | None, tpot_limit_ms: float | None) -> bool:
    """A good request (goodput): succeeded and met every given limit. One-token outputs have TPOT 0."""
    if not r.ok:
        return False
    if ttft_limit_ms is not None:
        t = ttft_ms(r)
        if t is None or t > ttft_limit_ms:
            return False
    if tpot_limit_ms is not None and (tpot_ms(r) or 0.0) > tpot_limit_ms:
        return False
    return True


KEEP_UP_POINTS = 41


def keep_up(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Did departures keep pace with arrivals? Over the second half of the arrival window.

    A short run can meet its p99 limits at a rate the server cannot sustain: the backlog is still small
    when arrivals stop, and the drain after the last arrival is fast. What gives it away is the number of
    requests in the system: steady at a sustainable rate, growing under overload. The slope of that count
    over the second half of the schedule (least squares over evenly spaced instants), as a fraction of the
    arrival rate, is the share of arrivals that did not leave: ``keep_up_ratio = 1 − slope / rate``. About
    1 in steady state, 0 when nothing leaves. Meaningful for open-loop arrivals only (a closed loop holds
    the count constant by construction); NaN where the schedule has no span.
    """
    scheduled = np.fromiter((r.scheduled for r in records), float, len(records))
    if len(scheduled) < 2 or not scheduled.max() > scheduled.min():
        return {"keep_up_ratio": NAN, "in_system_at_half": NAN, "in_system_at_end": NAN}
    done = np.fromiter((r.done if r.done is not None else math.inf for r in records), float, len(records))
    start, end = float(scheduled.min()), float(scheduled.max())
    rate = (len(scheduled) - 1) / (end - start)
    ts = np.linspace(start + (end - start) / 2, end, KEEP_UP_POINTS)
    scheduled.sort()
    done.sort()
    # in system at t = scheduled by t − done by t (a request is done after it was scheduled)
    counts = np.searchsorted(scheduled, ts, side="right") - np.searchsorted(done, ts, side="right")
    slope = float(np.polyfit(ts, counts, 1)[0])
    return {"keep_up_ratio": 1.0 - slope / rate, "in_system_at_half": float(counts[0]),
            "in_system_at_end": float(counts[-1])}


def summarize(records: Sequence[RequestRecord], duration_s: float, ttft_limit_ms: float | None = None,
              tpot_limit_ms: float | None = None, num_gpus: int = 1) -> dict[str, float]:
    """The run summary over non-warmup records; ``duration_s`` is the run's length from t0 to its end."""
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    out: dict[str, float] = {
        "requests_issued": len(measured),
        "requests_ok": len(ok),
        "requests_failed": len(failed),
        "error_rate": len(failed) / len(measured) if measured else 0.0,
    }
    kinds = dict.fromkeys(ERROR_KINDS, 0)
    for r in failed:
        kinds[r.status] = kinds.get(r.status, 0) + 1
    out.update({f"errors_{k}": v for k, v in sorted(kinds.items())})

    done_times = [r.done for r in measured if r.done is not None]
    window = max(done_times) if done_times else duration_s
    out["duration_s"] = duration_s
    out["throughput_window_s"] = window
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    out["output_tokens_total"] = out_tokens
    out["input_tokens_total"] = in_tokens
    rate = (lambda x: x / window) if window > 0 else (lambda x: NAN)
    out["request_per_s"] = rate(len(ok))
    out["output_tokens_per_s"] = rate(out_tokens)
    out["input_tokens_per_s"] = rate(in_tokens)
    out["output_tokens_per_s_per_gpu"] = out["output_tokens_per_s"] / max(num_gpus, 1)

    # The issued rate as LoadGen states it: (n − 1) arrivals over the span of the schedule.
    scheduled = sorted(r.scheduled for r in measured)
    span = scheduled[-1] - scheduled[0] if scheduled else 0.0
    out["scheduled_request_per_s"] = (len(scheduled) - 1) / span if span > 0 else NAN
    out["first_scheduled_s"] = scheduled[0] if scheduled else NAN
    out["last_scheduled_s"] = scheduled[-1] if scheduled else NAN
    sent = [r.sent for r in measured if r.sent is not None]
    out["last_sent_s"] = max(sent) if sent else NAN
    out["last_done_s"] = max(done_times) if done_times else NAN

    out.update(keep_up(measured))

    tpots = _present(tpot_ms(r) for r in ok)
    out["tokens_per_s_per_user"] = math.fsum(1000.0 / t for t in tpots if t > 0) / len(tpots) if tpots else NAN
    _stats("ttft", _present(ttft_ms(r) for r in ok), out)
    _stats("tpot", tpots, out)
    _stats("itl", [g for r in ok for g in itl_ms(r)], out)
    _stats("e2e", _present(e2e_ms(r) for r in ok), out)
    # Send-time latencies (the origin peers use) and raw chunk gaps, beside the scheduled-origin ones.
    _stats("ttft_from_send", _present(ttft_from_send_ms(r) for r in ok), out)
    _stats("e2e_from_send", _present(e2e_from_send_ms(r) for r in ok), out)
    _stats("chunk_gap", [g for r in ok for g in chunk_gaps_ms(r)], out)
    # MLPerf Endpoints' per-user rate: 1000 / TPOT p90.
    p90 = out["tpot_p90_ms"]
    out["tokens_per_s_per_user_at_tpot_p90"] = 1000.0 / p90 if p90 == p90 and p90 > 0 else NAN
    sources = [r.token_count_source for r in ok]
    out["tokens_from_usage_fraction"] = (sum(1 for x in sources if x.startswith("usage")) / len(sources)
                                         if sources else NAN)

    # How many requests were in flight (sent, not yet done): the x-axis of a concurrency/Pareto view.
    spans = [(r.sent, r.done) for r in measured if r.sent is not None and r.done is not None]
    out["concurrency_mean"] = math.fsum(d - s for s, d in spans) / window if window > 0 and spans else NAN
    out["concurrency_peak"] = _peak_overlap(spans)

    lags = sorted(_present(schedule_lag_ms(r) for r in measured))
    out["schedule_lag_mean_ms"] = math.fsum(lags) / len(lags) if lags else NAN
    out["schedule_lag_p99_ms"] = nearest_rank(lags, 0.99)
    out["schedule_lag_max_ms"] = lags[-1] if lags else NAN
    # Outputs that ended before their budget: EOS without ignore_eos, or a server capping lengths.
    short = sum(1 for r in ok if r.expected_output_tokens and r.output_tokens < r.expected_output_tokens)
    out["output_short_fraction"] = short / len(ok) if ok else NAN
    # Requested vs delivered output length. With ignore_eos a server must deliver exactly max_tokens; a
    # mismatch there means the workload was not the one asked for (a capped max_model_len, a server that
    # ignores ignore_eos). Without it, short outputs are the model's EOS and only the ratio is informative.
    requested = sum(r.expected_output_tokens for r in ok)
    out["output_tokens_requested_total"] = requested
    out["output_tokens_delivered_ratio"] = out_tokens / requested if requested else NAN
    forced = [r for r in ok if r.ignore_eos]
    out["ignore_eos_fraction"] = (sum(1 for r in ok if r.ignore_eos) / len(ok)) if ok else NAN
    out["output_length_mismatch_ignore_eos"] = sum(
        1 for r in forced if r.expected_output_tokens and r.output_tokens != r.expected_output_tokens)

    if ttft_limit_ms is not None or tpot_limit_ms is not None:
        good = sum(1 for r in ok if meets_limits(r, ttft_limit_ms, tpot_limit_ms))
        out["good_requests"] = good
        out["goodput_request_per_s"] = rate(good)
        out["goodput_output_tokens_per_s"] = rate(sum(r.output_tokens for r in ok
                                                      if meets_limits(r, ttft_limit_ms, tpot_limit_ms)))
        # AIPerf's good_request_fraction: failed requests stay in the denominator.
        out["good_request_fraction"] = good / len(measured) if measured else NAN
    # Over-limit counts feed MLPerf early stopping. A failed request never met its deadline, so it counts.
    if ttft_limit_ms is not None:
        out["ttft_over_limit_count"] = len(failed) + sum(1 for r in ok if _over(ttft_ms(r), ttft_limit_ms))
    if tpot_limit_ms is not None:
        out["tpot_over_limit_count"] = len(failed) + sum(1 for r in ok if (tpot_ms(r) or 0.0) > tpot_limit_ms)
    return out
