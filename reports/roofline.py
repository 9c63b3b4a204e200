"""How close a trial came to the hardware: measured output tokens/s against a roofline bound (an estimate).

The bound is the sim's roofline (``optimizer/perfmodel/roofline.py``) for the trial's own configuration, model shape
and GPU, with two changes that make it a ceiling rather than a prediction: the GPU runs at its datasheet
peak (compute, HBM and link efficiency 1.0, where the sim assumes 0.65 / 0.80 / 0.70), and host overhead
(scheduling, launch, sampling) costs nothing. It is evaluated for the *average* engine step of the
measured workload: ``B`` sequences decoding at the mean context, plus the prompt tokens the workload adds per
step in steady state (``B · input / output``), where ``B`` is the measured mean concurrency (capped by the
configuration's ``max_concurrency``). Output tokens per such step (``B``, more with speculative decoding)
over its time gives output tokens/s per replica; ``data_parallel`` replicas add up.

It is only an estimate: the model shape and GPU table are servetune's, real kernels never reach peak, and a
workload's concurrency varies over the run. It says "this configuration reached about X% of what the
hardware could possibly do at that concurrency", which is what makes two configurations comparable.
"""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Any

import pandas as pd

from servetune.optimizer.engines.sim.scheduler import SimConfig
from servetune.optimizer.perfmodel.hardware import get_gpu
from servetune.optimizer.perfmodel.model_shapes import ModelShape
from servetune.optimizer.perfmodel.roofline import Roofline, StepBatch
from servetune.reports.model import PARAM, Run

EXPLANATION = ("measured output tokens/s over the sim roofline's bound for this configuration, model "
               "shape and GPU at datasheet peak with no host overhead, at the measured mean concurrency")


@dataclasses.dataclass
class RooflineEstimate:
    fraction: float | None  # measured / bound, None when it could not be computed
    measured_tok_s: float | None = None
    bound_tok_s: float | None = None
    concurrency: float | None = None  # the B the bound was evaluated at
    concurrency_source: str = ""
    bound_at_max_tok_s: float | None = None  # the same bound at the configuration's max_concurrency
    bound_kind: str = ""  # which resource binds the average step: "memory" | "compute" (linear part)
    note: str = ""  # why there is none, or what it rests on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@lru_cache(maxsize=16)
def _shape(preset: str | None, path: str | None):
    return ModelShape.load(preset=preset, path=path)


def _peak_gpu(name: str, memory_gib: float | None):
    g = get_gpu(name).with_memory(memory_gib)
    return dataclasses.replace(g, compute_efficiency=1.0, bandwidth_efficiency=1.0, link_efficiency=1.0)


def _model_source(spec: dict[str, Any]) -> tuple[str | None, str | None]:
    m = spec.get("model")
    if isinstance(m, dict):
        return (str(m["preset"]) if m.get("preset") else None, str(m["path"]) if m.get("path") else None)
    if isinstance(m, str):
        return m, None
    return None, None


def _params(row: pd.Series) -> dict[str, Any]:
    """The trial's parameters, nested again (``speculative.method`` → ``speculative_method`` as the sim names)."""
    out: dict[str, Any] = {}
    for c in row.index:
        if not c.startswith(PARAM):
            continue
        v = row[c]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out[c[len(PARAM):].replace(".", "_")] = v
    return out


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _dataset_lengths(spec: dict[str, Any]) -> tuple[float | None, float | None]:
    w = spec.get("workload")
    w = w if isinstance(w, dict) else {}
    d = w.get("dataset")
    d = d if isinstance(d, dict) else {}
    return _f(d.get("input_tokens")), _f(d.get("output_tokens"))


def estimate(run: Run, row: pd.Series, scenario: str) -> RooflineEstimate:
    """The roofline fraction of one trial's measurement of ``scenario`` (never raises)."""
    try:
        return _estimate(run, row, scenario)
    except Exception as e:  # an unknown GPU, a model shape that cannot be read, params the sim refuses
        return RooflineEstimate(None, note=f"not available: {e.__class__.__name__}: {e}")


def _estimate(run: Run, row: pd.Series, scenario: str) -> RooflineEstimate:
    measured = _f(row.get(f"{scenario}.output_tokens_per_s"))
    if measured is None:
        return RooflineEstimate(None, note="not measured")
    preset, path = _model_source(run.spec)
    if not (preset or path):
        return RooflineEstimate(None, measured, note="not available: the study names no model shape")
    hw = run.spec.get("hardware")
    hw = hw if isinstance(hw, dict) else {}
    shape = _shape(preset, path)
    gpu = _peak_gpu(str(hw.get("gpu") or "h100"), _f(hw.get("gpu_memory_gib")))
    cfg = SimConfig.from_params(_params(row), strict=False)

    # Mean lengths of what was actually served, else what the study asked for.
    ok = _f(row.get(f"{scenario}.requests_ok"))
    tin, tout = _f(row.get(f"{scenario}.input_tokens_total")), _f(row.get(f"{scenario}.output_tokens_total"))
    d_in, d_out = _dataset_lengths(run.spec)
    n_in = tin / ok if (ok and tin is not None) else d_in
    n_out = tout / ok if (ok and tout is not None) else d_out
    if not n_in or not n_out:
        return RooflineEstimate(None, measured, note="not available: request lengths unknown")

    cap = float(cfg.max_concurrency * cfg.data_parallel)
    conc, source = _f(row.get(f"{scenario}.concurrency_mean")), "measured mean concurrency"
    if conc is None:
        rps, e2e = _f(row.get(f"{scenario}.request_per_s")), _f(row.get(f"{scenario}.e2e_mean_ms"))
        if rps and e2e:
            conc, source = rps * e2e / 1000.0, "concurrency from Little's law (req/s × mean E2E)"
        else:
            conc, source = cap, "max_concurrency (the run recorded no concurrency)"
    if conc > cap:  # the client counts requests queued in front of the engine too
        source = f"{source} {conc:,.0f}, capped at max_concurrency"
        conc = cap
    conc = max(conc, 1.0)

    rf = Roofline(shape, gpu, tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, quantization=cfg.quantization,
                  kv_cache_dtype=cfg.kv_cache_dtype, speculative_method=cfg.speculative_method,
                  speculative_tokens=cfg.speculative_tokens, enforce_eager=cfg.enforce_eager)
    a, k = cfg.acceptance, cfg.num_drafts
    per_step = (1 - a ** (k + 1)) / (1 - a) if (k and a < 1) else (k + 1 if k else 1)  # tokens a sequence emits

    def bound(b_total: float) -> tuple[float, str]:
        b = b_total / cfg.data_parallel  # sequences per replica
        ctx = n_in + n_out / 2.0  # mean context of a decoding sequence
        q = 1 + k  # query tokens per decoding sequence per step
        starts = b * per_step / n_out  # requests finishing, so new prompts entering, per step
        # Fractional counts on purpose: this is the mean step, not one the scheduler could run.
        step = StepBatch(decode_seqs=b, decode_tokens=b * q, decode_context=b * ctx,
                         decode_pairs=b * (q * ctx + q * (q + 1) / 2), prefill_seqs=starts,
                         prefill_tokens=starts * n_in, prefill_context=starts * n_in,
                         prefill_pairs=starts * n_in * (n_in + 1) / 2, sampled=b * q + starts,
                         draft_seqs=b if k else 0, draft_tokens=b * k)
        t = rf.step_time(step)
        core = t.total_s - t.overhead_s  # host overhead is not a hardware limit
        tokens = step.tokens / rf.pp
        math_s = 2.0 * tokens * rf.active_params_gpu / rf.linear_flops_rate
        bytes_s = (rf.attn_weight_bytes_gpu + rf.expert_bytes_gpu
                   + step.decode_context / rf.pp * rf.kv_bytes_per_token_gpu) / rf.bw
        return cfg.data_parallel * b * per_step / core, ("compute" if math_s > bytes_s else "memory")

    b_tok, kind = bound(conc)
    at_max, _ = bound(cap)
    return RooflineEstimate(fraction=measured / b_tok, measured_tok_s=measured, bound_tok_s=b_tok,
                            concurrency=conc, concurrency_source=source, bound_at_max_tok_s=at_max,
                            bound_kind=kind,
                            note=f"{shape.name} on {gpu.name.upper()} at peak; mean {n_in:,.0f} input / "
                                 f"{n_out:,.0f} output tokens per request")


def fractions(run: Run, scenario: str) -> dict[int, RooflineEstimate]:
    """The estimate of every complete trial that measured ``scenario``, by trial number."""
    out: dict[int, RooflineEstimate] = {}
    if f"{scenario}.output_tokens_per_s" not in run.trials:
        return out
    for _, r in run.trials.iterrows():
        if _f(r.get(f"{scenario}.output_tokens_per_s")) is not None:
            out[int(r["number"])] = estimate(run, r, scenario)
    return out


__all__ = ["RooflineEstimate", "estimate", "fractions", "EXPLANATION"]
