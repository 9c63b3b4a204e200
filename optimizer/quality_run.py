"""A trial's quality evaluation, run on its live server after the load levels (same launch).

Every item of the evaluation set (and of the task file, if any) goes to ``/v1/completions`` with greedy decoding
(``temperature: 0``), ``logprobs: K`` and ``echo: false``, not streamed. vLLM and SGLang both answer in the
OpenAI legacy shape, ``choices[0].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}``, where
``top_logprobs`` holds one ``{token text: logprob}`` map per generated token: vLLM's has the top K plus the
chosen token (the same one under greedy decoding), SGLang's the top K. Both return logprobs of the raw logits
under greedy decoding (vLLM's default ``logprobs_mode``; SGLang's all-greedy sampler path).

The answers land in ``trials/NNNN/eval.json``; the driver compares them with the baseline's
(:mod:`servetune.optimizer.quality`). The load generator is done by then, so the evaluation never disturbs a
measurement; its requests do show in the engine's counters after ``metrics_delta`` was taken.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from servetune.optimizer.evalset import EvalItem
from servetune.optimizer.records import write_json_atomic

EVAL_FILE = "eval.json"


def evaluate(base_url: str, model: str, settings: dict[str, Any], trial_dir: str | Path) -> dict[str, Any]:
    """Send the items of ``settings`` (built by ``QualityGate.trial_settings``), write ``eval.json`` and return
    what ``trial.json`` keeps of it: the file, the fingerprint, counts and time."""
    items = [EvalItem(**{**d, "answers": tuple(d.get("answers") or ())}) for d in settings["items"]]
    t0 = time.monotonic()
    answers = asyncio.run(_run_all(base_url, model, items, settings))
    write_json_atomic(Path(trial_dir) / EVAL_FILE, {"fingerprint": settings["fingerprint"],
                                                    "logprobs": settings["logprobs"], "items": answers}, indent=None)
    errors = [a["error"] for a in answers if a.get("error")]
    out: dict[str, Any] = {"file": EVAL_FILE, "fingerprint": settings["fingerprint"], "items": len(items),
                           "errors": len(errors), "seconds": round(time.monotonic() - t0, 3)}
    if errors:
        out["first_error"] = errors[0][:300]
    return out


async def _run_all(base_url: str, model: str, items: list[EvalItem], settings: dict[str, Any]) -> list[dict]:
    # aiohttp adds ~0.2 s to every CLI command: the reports package loads quality, which loads this module
    import aiohttp  # noqa: PLC0415 — start-up, measured

    url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1") + "/completions"
    gate = asyncio.Semaphore(int(settings.get("concurrency") or 1))
    timeout = aiohttp.ClientTimeout(total=float(settings.get("request_timeout_s") or 120))
    out: list[dict[str, Any]] = [{"id": i.id, "kind": i.kind, "prompt": i.prompt, "category": i.category,
                                  **({"answers": list(i.answers)} if i.answers else {})} for i in items]

    async def one(k: int, item: EvalItem, session) -> None:
        body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "temperature": 0,
                "logprobs": int(settings["logprobs"]), "echo": False, "stream": False}
        async with gate:
            try:
                async with session.post(url, json=body) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        out[k]["error"] = f"HTTP {resp.status}: {text[:200]}"
                        return
                    out[k].update(_parse(json.loads(text), keep_top=item.kind == "compare"))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, IndexError) as e:
                out[k]["error"] = f"{type(e).__name__}: {e}"[:300]

    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [asyncio.ensure_future(one(k, it, session)) for k, it in enumerate(items)]
        done, pending = await asyncio.wait(tasks, timeout=float(settings.get("timeout_s") or 600))
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for a in out:
        if "text" not in a and "error" not in a:
            a["error"] = f"not answered within the evaluation's {settings.get('timeout_s')} s"
    return out


def _parse(body: dict[str, Any], keep_top: bool = True) -> dict[str, Any]:
    """One OpenAI completion (non-streamed) with logprobs, as eval.json keeps it: logprobs to 1e-6 (far finer
    than any KL limit reads), the top-K maps only where a comparison uses them (tasks are scored on text)."""
    choice = body["choices"][0]
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        raise ValueError("the answer carries no logprobs (does the engine support them on /v1/completions?)")
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    out = {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason"),
           "tokens": [str(t) for t in lp["tokens"]],
           "token_logprobs": [None if x is None else round(float(x), 6) for x in lp.get("token_logprobs") or []]}
    if keep_top:
        out["top_logprobs"] = [{str(t): round(float(v), 6) for t, v in (m or {}).items()} for m in tops]
    return out
