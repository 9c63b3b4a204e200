"""One trial, start to finish: launch the engine, wait until healthy, run the scenarios, scrape, stop.

Runs inside a Ray task (or in-process for tests). Whatever happens, the engine's process group is gone
when this returns, and ``trial.json`` says what happened in one human line.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

from servetune.optimizer import process
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import Failure, FailureKind
from servetune.optimizer.records import TrialPlan, TrialResult, write_json_atomic

MAX_ERROR_RATE = 0.5  # more failed requests than this and the server, not the load, is the problem


def run_trial(plan: TrialPlan, gpu_ids: list[int]) -> TrialResult:
    trial_dir = Path(plan.trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    engine = get_engine(plan.engine, plan.engine_command, plan.engine_version)
    result = TrialResult(number=plan.number, engine=plan.engine, params=dict(plan.params), state="running",
                         is_baseline=plan.is_baseline, engine_version=engine.version, gpus=plan.gpus,
                         gpu_ids=list(gpu_ids), started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    t_start = time.monotonic()
    write_json_atomic(trial_dir / "trial.json", result.to_dict())
    ep = None
    try:
        if not plan.fake_gpus and not process.wait_gpus_free(gpu_ids, timeout_s=120):
            return _fail(result, Failure(FailureKind.INTERNAL, f"GPUs {gpu_ids} still hold memory from another process"))
        port = process.free_port(plan.host)
        launch = engine.plan(plan.params, plan.model, host=plan.host, port=port, gpu_ids=gpu_ids,
                             extra_args=plan.extra_args, extra_env=plan.extra_env, gpu=plan.gpu,
                             gpu_memory_gib=plan.gpu_memory_gib)
        result.argv = list(launch.argv)
        url_host = f"[{plan.host}]" if ":" in plan.host else ("127.0.0.1" if plan.host == "0.0.0.0" else plan.host)
        url = f"http://{url_host}:{port}"
        ep = process.start(launch.argv, launch.env, trial_dir / "engine.log", url)
        t_launch = time.monotonic()
        waited = process.wait_healthy(ep, launch.health_path, min(plan.ready_timeout_s, launch.ready_timeout_s))
        if waited is not None:
            code = ep.proc.poll() if waited == "exited" else None
            if waited == "timeout":
                failure = Failure(FailureKind.TIMEOUT, f"not healthy after {plan.ready_timeout_s:.0f} s")
            else:
                failure = engine.classify(ep.log_tail(), code)
                if waited == "fatal":
                    failure = Failure(failure.kind, "a worker failed while the server stayed up: " + failure.reason)
            return _fail(result, failure)
        result.ready_s = round(time.monotonic() - t_launch, 3)
        _measure(plan, engine, ep, url, launch.metrics_path, result)
        if result.state == "running":
            result.state = "complete"
        return result
    except Exception as e:  # never let one trial take the study down; say what broke
        return _fail(result, Failure(FailureKind.INTERNAL, f"{type(e).__name__}: {e}"))
    finally:
        if ep is not None:
            process.stop(ep)
            if not plan.fake_gpus:
                process.wait_gpus_free(gpu_ids, timeout_s=120)
            _redact_log(ep.log_path, plan.extra_env)
        result.wall_s = round(time.monotonic() - t_start, 3)
        write_json_atomic(trial_dir / "trial.json", result.to_dict())


def _measure(plan: TrialPlan, engine, ep, url: str, metrics_path: str, result: TrialResult) -> None:
    from servetune.loadgen import datasets
    from servetune.loadgen.endpoint import Endpoint
    from servetune.loadgen.scenarios import ScenarioSettings, run, write_records

    requests = _dataset(datasets, plan.dataset)
    endpoint = Endpoint(base_url=url, model=plan.model.name)
    before = _scrape(engine, url + metrics_path)
    first_before = before
    for sc in plan.scenarios:
        rates = sc.settings.get("qps")
        rates = rates if isinstance(rates, list) else [rates]
        levels = []
        for rate in rates:  # a load sweep within this one launch: no restart per level
            settings = ScenarioSettings(**{**sc.settings, "qps": rate, "num_gpus": plan.gpus})
            t0 = time.monotonic()
            sr = run(endpoint, requests, settings)
            result.loaded_s += time.monotonic() - t0
            suffix = "" if len(rates) == 1 else f"_qps{rate:g}"
            write_records(sr.records, Path(plan.trial_dir) / f"requests_{sc.label}{suffix}.csv")
            levels.append((rate, sr))
            if len(rates) > 1 and not sla_met(sr.summary, sc.settings):
                break  # higher rates only queue more: stop spending GPU time
        met = [(rate, sr) for rate, sr in levels if sla_met(sr.summary, sc.settings)]
        rate, sr = met[-1] if met else levels[0]
        result.scenarios[sc.label] = sr.to_dict()
        if len(rates) > 1:
            result.scenarios[sc.label]["levels"] = [{"qps": r, **s.to_dict()} for r, s in levels]
            result.scenarios[sc.label]["summary"]["max_valid_qps"] = met[-1][0] if met else 0.0
            write_records(sr.records, Path(plan.trial_dir) / f"requests_{sc.label}.csv")
        after = _scrape(engine, url + metrics_path)
        if before is not None and after is not None:
            result.scenarios[sc.label]["metrics_delta"] = _delta(engine, before, after)
        before = after
        if not ep.alive():
            failure = engine.classify(ep.log_tail(), ep.proc.poll())
            _fail(result, Failure(FailureKind.CRASH_UNDER_LOAD, f"died during {sc.label}: {failure.reason}"))
            return
        err = sr.summary.get("error_rate", 0.0)
        if err > MAX_ERROR_RATE:
            _fail(result, Failure(FailureKind.LOAD_ERRORS,
                                  f"{sc.label}: {err:.0%} of requests failed ({_error_kinds(sr.summary)})"))
            return
    if first_before is not None and before is not None:
        result.metrics_delta = _delta(engine, first_before, before)
    result.loaded_s = round(result.loaded_s, 3)


def sla_met(summary: dict[str, Any], settings: dict[str, Any], max_error_rate: float = 0.01) -> bool:
    """p99 TTFT and TPOT within the scenario's limits, and (almost) no failed requests."""
    for limit_key, metric in (("ttft_limit_ms", "ttft_p99_ms"), ("tpot_limit_ms", "tpot_p99_ms")):
        limit = settings.get(limit_key)
        value = summary.get(metric)
        if limit and (value is None or not value <= limit):
            return False
    return summary.get("error_rate", 0.0) <= max_error_rate


def _dataset(datasets, d: dict[str, Any]):
    d = dict(d)
    kind = d.pop("kind", "random")
    if kind == "random":
        return datasets.random_dataset(**d)
    if kind == "sharegpt":
        return datasets.sharegpt_dataset(d["path"], d["n"], seed=d.get("seed", 0))
    return datasets.token_id_dataset(d["path"])


def _scrape(engine, url: str) -> dict[str, float] | None:
    text = process.http_get(url)
    return engine.parse_metrics(text) if text is not None else None


def _delta(engine, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    if hasattr(engine, "metrics_delta"):
        return engine.metrics_delta(before, after)
    return {k: round(after[k] - before.get(k, 0.0), 6) for k in after}


def _error_kinds(summary: dict[str, Any]) -> str:
    kinds = {k.removeprefix("errors_"): int(v) for k, v in summary.items() if k.startswith("errors_") and v}
    return ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) or "unknown"


def _fail(result: TrialResult, failure: Failure) -> TrialResult:
    result.state = "failed"
    result.failure = {"kind": failure.kind.value, "reason": failure.reason}
    return result


def _redact_log(path: Path, env: dict[str, str]) -> None:
    from servetune.optimizer.process import redact, resolve_env

    secrets = resolve_env(env)
    if not any(secrets.values()):
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        cleaned = redact(text, secrets)
        if cleaned != text:
            path.write_text(cleaned, encoding="utf-8")
    except OSError:
        pass
