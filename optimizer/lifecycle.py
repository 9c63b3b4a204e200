"""One trial, start to finish: launch the engine, wait until healthy, run the scenarios, scrape, stop.

Runs inside a Ray task (or in-process for tests). Whatever happens, the engine's process group is gone
when this returns, and ``trial.json`` says what happened in one human line.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import time
from pathlib import Path
from typing import Any

from servetune.loadgen import datasets
from servetune.loadgen.audit import Auditor, contaminated
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.records import ScenarioResult
from servetune.loadgen.scenario_kinds import level_key
from servetune.loadgen.scenarios import ScenarioSettings, run, write_records
from servetune.loadgen.search import find_max_qps, level_variant, longest_level_s
from servetune.loadgen.sla import within_limits
from servetune.loadgen.tokenizer import PromptTokenizer
from servetune.optimizer import process, run_dir, secret_refs
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import Failure, FailureKind
from servetune.optimizer.engines.probe import EngineProbe
from servetune.optimizer.progress import TrialProgress
from servetune.optimizer.quality_run import evaluate
from servetune.optimizer.records import TrialPlan, TrialResult
from servetune.optimizer.spec import rate_bracket, rate_floor
from servetune.optimizer.warmup import Warmer, ramp_top

MAX_ERROR_RATE = 0.5  # more failed requests than this and the server, not the load, is the problem
# Seconds an engine gets between SIGTERM and SIGKILL, and a GPU to drop its memory after a trial; the
# environment can shorten them (tests, CI) or lengthen them (engines that take long to shut down).
STOP_GRACE_S = float(os.environ.get("SERVETUNE_STOP_GRACE_S", "20"))
GPU_FREE_TIMEOUT_S = float(os.environ.get("SERVETUNE_GPU_FREE_TIMEOUT_S", "120"))
# Another process took the port between free_port() and the engine's bind: relaunch on a fresh port.
PORT_IN_USE = re.compile(r"[Aa]ddress already in use|Errno 98|EADDRINUSE|port .* is already in use|"
                         r"error while attempting to bind")
PORT_ATTEMPTS = 2


def run_trial(plan: TrialPlan, gpu_ids: list[int]) -> TrialResult:
    trial_dir = Path(plan.trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    engine = get_engine(plan.engine, plan.engine_command, plan.engine_version)
    result = TrialResult(number=plan.number, engine=plan.engine, params=dict(plan.params), state="running",
                         is_baseline=plan.is_baseline, engine_version=engine.version, gpus=plan.gpus,
                         gpu_ids=list(gpu_ids),
                         started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"))
    t_start = time.monotonic()
    run_dir.write_record(trial_dir, result)
    progress = TrialProgress(trial_dir, plan.scenarios)  # progress.json, which the driver polls
    ep = None
    try:
        if not plan.fake_gpus and not process.wait_gpus_free(gpu_ids, timeout_s=GPU_FREE_TIMEOUT_S):
            return _fail(result, Failure(FailureKind.INTERNAL, f"GPUs {gpu_ids} still hold memory from another "
                                         f"process after {GPU_FREE_TIMEOUT_S:.0f} s"))
        for attempt in range(PORT_ATTEMPTS):
            port = process.free_port(plan.host)
            launch = engine.plan(plan.params, plan.model, host=plan.host, port=port, gpu_ids=gpu_ids,
                                 extra_args=plan.extra_args, extra_env=plan.extra_env, gpu=plan.gpu,
                                 gpu_memory_gib=plan.gpu_memory_gib)
            result.argv = list(launch.argv)
            url_host = f"[{plan.host}]" if ":" in plan.host else ("127.0.0.1" if plan.host == "0.0.0.0" else plan.host)
            url = f"http://{url_host}:{port}"
            ep = process.start(launch.argv, launch.env, trial_dir / "engine.log", url)
            t_launch = time.monotonic()
            timeout_s = min(plan.ready_timeout_s, launch.ready_timeout_s)
            waited = process.wait_healthy(ep, launch.health_path, timeout_s)
            if waited is None:
                break
            code = ep.proc.poll() if waited == "exited" else None
            tail = ep.log_tail()
            if waited == "exited" and PORT_IN_USE.search(tail):
                process.stop(ep, grace_s=STOP_GRACE_S)
                ep = None
                if attempt + 1 < PORT_ATTEMPTS:
                    process.append_log(trial_dir / "engine.log", f"servetune: port {port} was taken before the "
                                       "engine could bind it; relaunching on a fresh port")
                    continue
                line = next((ln for ln in reversed(tail.splitlines()) if PORT_IN_USE.search(ln)), "")
                return _fail(result, Failure(FailureKind.CRASH, f"port {port} was already in use by another "
                                             f"process ({PORT_ATTEMPTS} fresh ports tried): {line.strip()[:200]}"))
            if waited == "timeout":
                failure = Failure(FailureKind.TIMEOUT, f"not healthy after {timeout_s:.0f} s")
            else:
                failure = engine.classify(tail, code)
                if waited == "fatal":
                    reason = failure.reason
                    if failure.kind == FailureKind.CRASH:  # nothing more specific: quote the fatal line itself
                        line = next((ln for ln in reversed(tail.splitlines()) if process.FATAL_LOG.search(ln)), "")
                        reason = line.strip()[:200] or reason
                    failure = Failure(failure.kind, "a worker failed while the server stayed up: " + reason)
            return _fail(result, failure)
        result.ready_s = round(time.monotonic() - t_launch, 3)
        _measure(plan, engine, ep, url, launch.metrics_path, result, progress)
        if result.state == "running" and plan.quality:
            _evaluate(plan, ep, url, result)
        if result.state == "running":
            result.state = "complete"
        return result
    except Exception as e:  # never let one trial take the study down; say what broke
        return _fail(result, Failure(FailureKind.INTERNAL, f"{type(e).__name__}: {e}"))
    finally:
        progress.close()
        if ep is not None:
            process.stop(ep, grace_s=STOP_GRACE_S)
            if ep.killed_after_grace:
                process.append_log(ep.log_path, f"servetune: the engine ignored SIGTERM for {STOP_GRACE_S:.0f} s; "
                                   "its process group was killed")
            if not plan.fake_gpus and not process.wait_gpus_free(gpu_ids, timeout_s=GPU_FREE_TIMEOUT_S):
                process.append_log(ep.log_path, f"servetune: GPUs {gpu_ids} still held memory "
                                   f"{GPU_FREE_TIMEOUT_S:.0f} s after the engine stopped")
        _redact_trial(result, trial_dir, plan)
        result.wall_s = round(time.monotonic() - t_start, 3)
        run_dir.write_record(trial_dir, result)


def _measure(plan: TrialPlan, engine, ep, url: str, metrics_path: str, result: TrialResult, progress=None) -> None:
    trial_requests = None  # built once, when a scenario without its own dataset needs it
    # Every level of every scenario in this launch gets prompts no earlier level sent: the engine's prefix
    # cache survives between levels, and replayed prompts would skip their prefill and inflate capacity.
    epoch = 0
    endpoint = Endpoint(base_url=url, model=plan.model.name)

    def scrape() -> dict[str, float] | None:
        return _scrape(engine, url + metrics_path)

    if plan.audit.get("enabled") or plan.warmup.get("enabled"):
        # the warm-up (and an audit's re-warm) sends the study's dataset; a scenario's own dataset is measured
        trial_requests = _dataset(datasets, plan.dataset)
    auditor, warmer = _audit_tools(plan, engine, endpoint, trial_requests, url + metrics_path)
    if warmer is not None and plan.warmup.get("enabled"):
        result.warmup = warmer.warm()
        if not ep.alive():
            failure = engine.classify(ep.log_tail(), ep.proc.poll())
            _fail(result, Failure(FailureKind.CRASH_UNDER_LOAD, f"died during the warm-up: {failure.reason}"))
            return
    before = scrape()
    first_before = before
    for sc in plan.scenarios:
        if progress is not None:
            progress.scenario(sc)
        if sc.dataset:
            requests = _dataset(datasets, sc.dataset)
        else:
            trial_requests = trial_requests or _dataset(datasets, plan.dataset)
            requests = trial_requests
        t0 = time.monotonic()
        level_deltas: dict[int, dict[str, float]] = {}  # level index -> the engine's counters over that level
        if sc.max_qps:
            sr, levels, summary_extra, runs = _search_rate(plan, endpoint, requests, sc, epoch, auditor)
        else:
            sr, levels, summary_extra, runs = _sweep(plan, endpoint, requests, sc, epoch, auditor,
                                                     scrape=scrape, deltas=level_deltas, engine=engine)
        epoch += runs
        result.loaded_s += time.monotonic() - t0
        result.scenarios[sc.label] = sr.to_dict()
        if len(levels) > 1 or sc.max_qps:
            key = _swept(sc)
            for rate, s_ in levels:
                suffix = f"_{'qps' if key == 'qps' else 'c'}{rate:.4g}"
                _write_records_atomic(write_records, s_.records,
                                      Path(plan.trial_dir) / f"requests_{sc.label}{suffix}.csv")
            result.scenarios[sc.label]["levels"] = [
                {key: r, **s_.to_dict(), **({"metrics_delta": level_deltas[i]} if i in level_deltas else {})}
                for i, (r, s_) in sorted(enumerate(levels), key=lambda x: x[1][0])]
            result.scenarios[sc.label]["summary"].update(summary_extra)
        dirty = [rate for rate, s_ in levels if contaminated(s_)]
        if dirty:
            result.scenarios[sc.label]["contaminated_levels"] = sorted(dirty)
        if contaminated(sr):
            # the reported level still failed its audit after a re-run: no verdict on the configuration
            result.scenarios[sc.label]["contaminated"] = True
        _write_records_atomic(write_records, sr.records, Path(plan.trial_dir) / f"requests_{sc.label}.csv")
        after = _scrape(engine, url + metrics_path)
        if before is not None and after is not None:
            result.scenarios[sc.label]["metrics_delta"] = _delta(engine, before, after)
        before = after
        if not ep.alive():
            failure = engine.classify(ep.log_tail(), ep.proc.poll())
            _fail(result, Failure(FailureKind.CRASH_UNDER_LOAD, f"died during {sc.label}: {failure.reason}"))
            return
        if sr.summary.get("requests_ok", 0) and not sr.summary.get("output_tokens_per_s"):
            _fail(result, Failure(FailureKind.LOAD_ERRORS, f"{sc.label}: the server answered "
                                  f"{sr.summary.get('requests_ok')} requests but streamed no output tokens"))
            return
        err = sr.summary.get("error_rate", 0.0)
        if err > MAX_ERROR_RATE:
            _fail(result, Failure(FailureKind.LOAD_ERRORS,
                                  f"{sc.label}: {err:.0%} of requests failed ({_error_kinds(sr.summary)})"))
            return
    if first_before is not None and before is not None:
        result.metrics_delta = _delta(engine, first_before, before)
    result.loaded_s = round(result.loaded_s, 3)


def _evaluate(plan: TrialPlan, ep, url: str, result: TrialResult) -> None:
    """The quality evaluation on this launch, after the load. Whatever goes wrong here leaves the measured
    trial complete: the evaluation's record says what broke, and the driver judges that as unchecked."""
    settings = plan.quality
    assert settings is not None  # run_trial evaluates only a plan that asks for it
    try:
        result.quality = evaluate(url, plan.model.name, settings, plan.trial_dir)
    except Exception as e:  # noqa: BLE001  (a broken evaluation must not lose the load measurement)
        result.quality = {"error": f"the evaluation failed: {type(e).__name__}: {e}"[:300]}
    if not ep.alive():
        failure = ep.log_tail()[-300:].strip().splitlines()[-1:] or [""]
        result.quality = {**(result.quality or {}), "error": f"the engine died during the evaluation: {failure[0]}"}


def _swept(sc) -> str:
    """The setting a scenario's levels vary."""
    return level_key(sc.settings.get("kind"))


def _audit_tools(plan: TrialPlan, engine, endpoint, requests, metrics_url: str):
    """The launch's level auditor and warmer (None, None when both are off)."""
    audit, warm = plan.audit, plan.warmup
    if not (audit.get("enabled") or warm.get("enabled")):
        return None, None
    probe = EngineProbe(engine, metrics_url, Path(plan.trial_dir) / "engine.log")
    auditor = Auditor(probe, max_prefix_hit_fraction=audit.get("max_prefix_cache_hit_fraction", 0.01),
                      rerun=audit.get("rerun", True))
    cap = plan.params.get("max_concurrency") or engine.defaults().get("max_concurrency")
    top = ramp_top(plan.scenarios, requests, plan.gpus, cap if isinstance(cap, int) else None,
                   warm.get("max_concurrency"))
    warmer = Warmer(endpoint, requests, auditor, top, max_s=float(warm.get("max_s") or 300.0))
    auditor.rewarm = warmer.rewarm
    return (auditor if audit.get("enabled") else None), warmer


class _Fresh:
    """Runs of one level, each sending prompts no earlier run sent (the audit's re-run among them)."""

    def __init__(self, endpoint, requests, settings, first: int) -> None:
        self.endpoint, self.requests, self.settings, self.first = endpoint, requests, settings, first
        self.runs = 0

    def __call__(self):
        self.runs += 1
        return run(self.endpoint, level_variant(self.requests, self.first + self.runs - 1), self.settings)


def _sweep(plan: TrialPlan, endpoint, requests, sc, epoch: int, auditor=None, scrape=None, deltas=None,
           engine=None):
    """The scenario's fixed rate(s) or concurrency level(s), in order, stopping at the first SLA miss.

    A level whose audit fails runs once more after more warm-up; one still contaminated after that is no
    SLA miss: the sweep goes on past it and never reports it as met.

    Returns the result to report (the highest level that met the SLA, else the first clean one, else the
    first), every level run as (level, result), what goes into the reported summary, and how many runs
    were made. With ``scrape``, the engine's /metrics are read around each level of a sweep and ``deltas[i]``
    gets level i's (speculative acceptance and the like, per load level; an audit's re-run included)."""
    key = _swept(sc)
    rates = sc.settings.get(key)
    rates = rates if isinstance(rates, list) else [rates]
    levels: list[tuple[float, ScenarioResult]] = []
    runs = 0
    per_level = scrape is not None and deltas is not None and len(rates) > 1
    for rate in rates:  # a load sweep within this one launch: no restart per level
        settings = ScenarioSettings(**{**sc.settings, key: rate, "num_gpus": plan.gpus})
        before = scrape() if per_level else None
        once = _Fresh(endpoint, requests, settings, epoch + runs)
        sr = auditor.measure(once, settings) if auditor is not None else once()
        runs += once.runs
        after = scrape() if before is not None else None
        if before is not None and after is not None:
            deltas[len(levels)] = _delta(engine, before, after)
        levels.append((rate, sr))
        if len(rates) > 1 and not contaminated(sr) and not sla_met(sr.summary, sc.settings):
            break  # higher rates only queue more: stop spending GPU time
    met = [(rate, sr) for rate, sr in levels if sla_met(sr.summary, sc.settings)]
    clean = [sr for _, sr in levels if not contaminated(sr)]
    best = met[-1][1] if met else (clean or [levels[0][1]])[0]
    extra = {f"max_valid_{key}": met[-1][0] if met else 0.0} if len(rates) > 1 else {}
    return best, levels, extra, runs


def _search_rate(plan: TrialPlan, endpoint, requests, sc, epoch: int, auditor=None):
    """The highest rate meeting the SLA, bracketed and narrowed on this one launch (find_max_qps)."""
    m = sc.max_qps
    lo, hi = rate_bracket(m, plan.gpus)
    settings = ScenarioSettings(**{**sc.settings, "qps": lo, "num_gpus": plan.gpus})
    found = find_max_qps(endpoint, requests, settings, lo=lo, hi=hi, tolerance=m["tolerance"],
                         max_levels=m["max_levels"], level_offset=epoch,
                         max_level_duration_s=longest_level_s(settings, m.get("max_level_duration_s")),
                         floor=rate_floor(m, plan.gpus), auditor=auditor)
    levels = [(r.settings["qps"], r) for r in found.levels]
    # no valid rate: report the lowest one tried (the floor), the level the "SLA missed" verdict rests on
    best = found.best or min(found.levels, key=lambda r: r.settings["qps"])
    lo_valid, hi_invalid = found.bracket
    extra = {"max_valid_qps": found.best_qps or 0.0, "max_qps_stopped_because": found.stopped_because,
             "max_qps_bracket_low": lo_valid, "max_qps_bracket_high": hi_invalid, "max_qps_floor": found.floor}
    return best, levels, {k: v for k, v in extra.items() if v is not None}, found.runs


def sla_met(summary: dict[str, Any], settings: dict[str, Any], max_error_rate: float = 0.01) -> bool:
    """p99 TTFT and TPOT within the scenario's limits, (almost) no failed requests, and a server that kept up
    (loadgen.validity's keep-up rule, where it was judged). A contaminated level (loadgen.audit) meets
    nothing: what it measured is not the configuration's."""
    if not summary.get("steady_state_met", 1.0) or summary.get("audit_contaminated"):
        return False
    return within_limits(summary, settings) and summary.get("error_rate", 0.0) <= max_error_rate


def _dataset(datasets, d: dict[str, Any]):
    d = dict(d)
    kind = d.pop("kind", "random")
    temperature = d.pop("temperature", None)
    if kind == "random":
        tokenizer = d.pop("tokenizer", None)
        requests = datasets.random_dataset(**d, tokenizer=PromptTokenizer(tokenizer) if tokenizer else None)
    elif kind == "text_tasks":
        requests = datasets.text_task_dataset(**d)
    elif kind == "sharegpt":
        requests = datasets.sharegpt_dataset(d["path"], d["n"], seed=d.get("seed", 0))
    else:
        requests = datasets.token_id_dataset(d["path"])
    return datasets.with_temperature(requests, temperature)


def _scrape(engine, url: str) -> dict[str, float] | None:
    text = process.http_get(url)
    return engine.parse_metrics(text) if text is not None else None


def _delta(engine, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return engine.metrics_delta(before, after)


def _error_kinds(summary: dict[str, Any]) -> str:
    kinds = {k.removeprefix("errors_"): int(v) for k, v in summary.items() if k.startswith("errors_") and v}
    return ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) or "unknown"


def _fail(result: TrialResult, failure: Failure) -> TrialResult:
    result.state = "failed"
    result.failure = {"kind": failure.kind.value, "reason": failure.reason}
    return result


def _redact_trial(result: TrialResult, trial_dir: Path, plan: TrialPlan) -> None:
    """Secret values an engine echoed never stay on disk: not in its log, the request records (error bodies)
    or the failure reason quoted from its log. Every value a ``${NAME}`` reference of the engine's env or
    extra_args brought in is masked, whatever the name of the key or flag that carried it."""
    values = secret_refs.referenced([*plan.extra_env.values(), *plan.extra_args])
    if result.failure and result.failure.get("reason"):
        result.failure = {**result.failure, "reason": secret_refs.mask(result.failure["reason"], values)}
    redact_files(trial_dir, values)


def redact_files(trial_dir: Path, values: dict[str, str]) -> None:
    """Mask the values in the files a trial writes text to (also run on a trial a killed driver left)."""
    if not any(values.values()):
        return
    for path in [trial_dir / "engine.log", *sorted(trial_dir.glob("requests_*.csv"))]:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            cleaned = secret_refs.mask(text, values)
            if cleaned != text:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(cleaned, encoding="utf-8")
                os.replace(tmp, path)
        except OSError:
            pass


def _write_records_atomic(write_records, records, path: Path) -> None:
    """loadgen writes in place; write beside and rename so a killed trial never leaves half a CSV."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: same format
    try:
        write_records(records, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
