"""Datasets: lists of :class:`Request` to replay against a server.

Five sources:

- ``random_dataset``: synthetic prompts of known length, as text or as token ids (``prompt_format``).
  With the model's tokenizer (:mod:`~servetune.loadgen.tokenizer`) both are exact and the same tokens: the
  text encodes back to the ids it was decoded from, so the server counts ``input_tokens`` either way, and
  text makes the server tokenize inside TTFT as it does for real clients. Without a tokenizer, token ids
  are exact (vLLM and SGLang accept ``prompt`` as a list of ints on ``/v1/completions``) and text is
  space-separated common English words, about one token each with Llama/Qwen/GPT-style BPE vocabularies
  (the server's ``usage.prompt_tokens`` is the truth and ends up in the records).
- ``sharegpt_dataset``: the first human turn of ShareGPT conversations, with the first answer's length as
  the output budget (word count, the same one-word-one-token approximation). A prompt that appears twice
  in the file is kept once.
- ``token_id_dataset``: pre-tokenized JSONL, ``{"prompt_token_ids": [...], "max_tokens": N}`` per line.
- ``prompt_file_dataset``: text prompts exactly as a file lists them, in its order, repeats included (another
  client's prompts sent again, so that two clients are compared on the same requests).
- ``text_task_dataset``: real text shipped with servetune (``loadgen/data/text_tasks.json``) as tasks whose
  answers reuse their input (rewrite, summarize, code_edit: the source is quoted in a fenced block) or do not
  (freeform: a topic, nothing to copy). The workload that separates where speculative decoding by prompt
  lookup helps from where it costs (docs/speculative.md).

Every synthetic prompt starts with a per-request salt: random leading tokens that are unique within the
dataset, so no two prompts share a prefix-cache block and a warm cache cannot inflate throughput
(vllm#52884). The salt depends on ``seed``, so rerunning with another seed also misses the cache. A
workload that measures the prefix cache on purpose declares it: ``shared_prefix_tokens`` puts the same
leading tokens (then the salt) in every prompt. Issuing a sample more than once (more requests than the
dataset holds) still sends a distinct prompt each time; see :func:`~servetune.loadgen.runner.repeat_variant`.
"""
from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from servetune.loadgen.records import Request

if TYPE_CHECKING:
    from servetune.loadgen.tokenizer import PromptTokenizer

# Ids below this are avoided: many vocabularies keep special/control tokens (BOS, EOS, pad, byte
# fallbacks) at the bottom, and a random EOS would end a request early when ignore_eos is off.
SAFE_ID_LOW = 1000

# Salt length in tokens: 4 tokens from a ~31k-id range is ~60 bits, enough for datasets far beyond any
# benchmark while leaving almost the whole prompt to the requested length.
SALT_TOKENS = 4
SALT_WORDS = 8  # from the 240-word list below: ~63 bits

# Common English words that BPE vocabularies (Llama, Qwen, GPT, Mistral) hold as one token with their
# leading space, so "n words" is close to "n tokens".
WORDS = tuple(
    """the of and to in is was for on that with as by at from his her he she it they we you are were be
    been has have had not but or an this which their there one all would will can who more when if out
    so up said what its about than into them only other new some could time these two may then do first
    any my now such like our over man me even most made after also did many before must through back
    years where much your way well down should because each just those people how too little state good
    very make world still own see men work long get here between both life being under never day same
    another know while last might us great old year off come since against go came right used take three
    place small found part again home head house water room mother night area money story young fact month
    lot study book eye job word business issue side kind four five six seven eight nine ten hand point
    city play give turn move live feel show hold bring begin keep start run write read talk stand hear
    let mean set meet pay sit speak lie lead grow lose fall send build stay reach learn open walk win
    offer remember love consider appear buy wait serve die expect stop close break spend create drive
    return hope watch""".split()
)


def _check_lengths(name: str, value: int, spread: float) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"{name.split('_')[0]}_range must be in [0, 1), got {spread}")


def _lengths(rng: np.random.Generator, n: int, mean: int, spread: float) -> np.ndarray:
    """Uniform integers in [mean·(1−spread), mean·(1+spread)], at least 1 (vLLM's range-ratio meaning)."""
    low = max(1, int(round(mean * (1.0 - spread))))
    high = max(low, int(round(mean * (1.0 + spread))))
    return rng.integers(low, high + 1, size=n)


def _unique_salts(rng: np.random.Generator, n: int, length: int, alphabet: int) -> np.ndarray:
    """``n`` distinct rows of ``length`` symbols from ``range(alphabet)``; redraw only the collisions."""
    if alphabet ** length < n:
        raise ValueError(f"cannot make {n} distinct salts of {length} symbols from {alphabet}")
    salts = rng.integers(0, alphabet, size=(n, length))
    while True:
        _, first = np.unique(salts, axis=0, return_index=True)
        dup = np.setdiff1d(np.arange(n), first)
        if dup.size == 0:
            return salts
        salts[dup] = rng.integers(0, alphabet, size=(dup.size, length))


PROMPT_FORMATS = ("text", "token_ids")


def random_dataset(
    n: int,
    input_tokens: int,
    output_tokens: int,
    input_range: float = 0.0,
    output_range: float = 0.0,
    seed: int = 0,
    vocab_size: int = 32000,
    ignore_eos: bool = True,
    prompt_format: str = "token_ids",
    tokenizer: "PromptTokenizer | None" = None,
    shared_prefix_tokens: int = 0,
) -> list[Request]:
    """``n`` salted random prompts of ``input_tokens`` (±``input_range``) asking for ``output_tokens``.

    ``prompt_format`` is ``token_ids`` or ``text``. With ``tokenizer`` the ids are the vocabulary's word
    tokens and ``input_tokens`` counts what the server holds, its special tokens included (see
    :mod:`~servetune.loadgen.tokenizer`); without it, ids are drawn from ``[1000, vocab_size)`` and text
    is common words. ``shared_prefix_tokens`` leading tokens are the same in every prompt (a declared
    prefix-cache workload); the unique salt follows them. ``ignore_eos`` defaults on because random
    prompts give the model no reason to stop where the benchmark wants; MLPerf-style runs on real data
    turn it off.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    _check_lengths("input_tokens", input_tokens, input_range)
    _check_lengths("output_tokens", output_tokens, output_range)
    if tokenizer is None and vocab_size <= SAFE_ID_LOW + 1:
        raise ValueError(f"vocab_size must exceed {SAFE_ID_LOW + 1}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, n, input_tokens, input_range)
    out_lens = _lengths(rng, n, output_tokens, output_range)
    specials = tokenizer.specials if tokenizer is not None else 0
    body_lens = np.maximum(in_lens - specials, 1)  # the server adds its special tokens to what we send
    if not 0 <= shared_prefix_tokens < int(body_lens.min()):
        raise ValueError(f"shared_prefix_tokens must be below the shortest prompt ({int(body_lens.min())} tokens "
                         f"to draw), got {shared_prefix_tokens}")
    if tokenizer is not None:
        alphabet = tokenizer.pool
    elif prompt_format == "token_ids":
        alphabet = np.arange(SAFE_ID_LOW, vocab_size)
    else:
        alphabet = np.arange(len(WORDS))
    salt_len = SALT_WORDS if (tokenizer is None and prompt_format == "text") else SALT_TOKENS
    prefix = alphabet[rng.integers(0, alphabet.size, size=shared_prefix_tokens)]
    # A prompt shorter than the salt is all salt; it must still be unique on its own.
    salts = _unique_salts(rng, n, min(salt_len, int(body_lens.min()) - shared_prefix_tokens), alphabet.size)
    rows = []
    for i in range(n):
        body = rng.integers(0, alphabet.size, size=int(body_lens[i]) - shared_prefix_tokens)
        body[: salts.shape[1]] = salts[i]
        rows.append(np.concatenate((prefix, alphabet[body])))
    if tokenizer is not None:
        texts, ids = tokenizer.prompts(rows, rng)
        prompts: list[str | list[int]] = (list(texts) if prompt_format == "text"
                                          else [tokenizer.with_specials(x) for x in ids])
        lengths = [len(x) + specials for x in ids]
    elif prompt_format == "token_ids":
        prompts, lengths = [r.tolist() for r in rows], [len(r) for r in rows]
    else:
        prompts, lengths = [" ".join(WORDS[w] for w in r) for r in rows], [len(r) for r in rows]
    return [Request(prompt=p, max_tokens=int(o), input_tokens=int(k), ignore_eos=ignore_eos)
            for p, o, k in zip(prompts, out_lens, lengths)]


def prompt_format_of(requests: Iterable[Request]) -> str:
    """``text``, ``token_ids``, or ``mixed``: what a list of requests sends (recorded with every run)."""
    kinds = {"text" if isinstance(r.prompt, str) else "token_ids" for r in requests}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _read_records(path: str | Path) -> list[Any]:
    """A JSON array, or JSONL (one JSON value per line). Errors name the file and line."""
    p = Path(path)
    if p.exists() and not p.is_file():  # a FIFO would block the read, a device would never end
        raise ValueError(f"dataset {p} is not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read dataset {p}: {e}") from None
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"dataset {p} is empty")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset {p} is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"dataset {p} nests too deeply to be a dataset") from None
        return data
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except RecursionError:
            raise ValueError(f"dataset {p} line {lineno} nests too deeply to be a dataset") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset {p} line {lineno} is not valid JSON: {e}") from None
    return items


def _sharegpt_pair(item: Any) -> tuple[str, str] | None:
    """(first human turn, first answer) of one ShareGPT entry, or None when it has no such pair."""
    if not isinstance(item, dict):
        return None
    turns = item.get("conversations", item.get("conversation"))
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("from", first.get("role")) not in ("human", "user"):
        return None
    prompt, answer = first.get("value", first.get("content")), second.get("value", second.get("content"))
    if not (isinstance(prompt, str) and isinstance(answer, str)):
        return None
    return prompt, answer


def sharegpt_dataset(
    path: str | Path,
    n: int | None = None,
    seed: int = 0,
    min_words: int = 4,
    max_input_words: int | None = None,
    max_output_tokens: int | None = None,
    ignore_eos: bool = False,
) -> list[Request]:
    """``n`` conversations (all usable ones when None) from a ShareGPT JSON or JSONL file, chosen by a
    seeded shuffle.

    The prompt is ``conversations[0]`` (human); the output budget is the word count of ``conversations[1]``
    (gpt), capped at ``max_output_tokens``. Pairs with fewer than ``min_words`` words on either side are
    skipped, as vLLM and SGLang do, because they measure little but connection overhead.
    """
    items = _read_records(path)
    if not isinstance(items, list):
        raise ValueError(f"dataset {path}: expected a list of conversations, got {type(items).__name__}")
    usable, seen = [], set()
    for item in items:
        pair = _sharegpt_pair(item)
        if pair is None or pair[0] in seen:  # a repeated prompt would be a prefix-cache hit, not a new request
            continue
        seen.add(pair[0])
        in_words, out_words = len(pair[0].split()), len(pair[1].split())
        if in_words < min_words or out_words < min_words:
            continue
        if max_input_words is not None and in_words > max_input_words:
            continue
        usable.append((pair[0], in_words, out_words))
    if not usable:
        raise ValueError(f"dataset {path}: no ShareGPT conversations with a human turn and an answer "
                         f"(of {len(items)} entries)")
    if n is None:
        n = len(usable)
    if n > len(usable):
        raise ValueError(f"dataset {path}: asked for {n} conversations, only {len(usable)} usable")
    order = np.random.default_rng(seed).permutation(len(usable))[:n]
    requests = []
    for i in order:
        prompt, in_words, out_words = usable[int(i)]
        max_tokens = out_words if max_output_tokens is None else min(out_words, max_output_tokens)
        requests.append(Request(prompt=prompt, max_tokens=max_tokens, input_tokens=in_words,
                                ignore_eos=ignore_eos))
    return requests


def _token_ids(value: Any) -> list[int] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return value


def _budget(item: dict[str, Any], where: str, max_tokens: int | None, ignore_eos: bool) -> tuple[int, bool]:
    """A record's ``max_tokens`` and ``ignore_eos`` (the defaults where it sets none), checked."""
    budget, eos = item.get("max_tokens", max_tokens), item.get("ignore_eos", ignore_eos)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"{where}: 'max_tokens' must be a positive int, got {budget!r}")
    if not isinstance(eos, bool):
        raise ValueError(f"{where}: 'ignore_eos' must be true or false, got {eos!r}")
    return budget, eos


def token_id_dataset(path: str | Path, ignore_eos: bool = False) -> list[Request]:
    """Pre-tokenized requests from JSONL: ``{"prompt_token_ids": [...], "max_tokens": N}`` per line.

    A line may carry its own ``"ignore_eos"``; otherwise ``ignore_eos`` applies.
    """
    items: Iterable[Any] = _read_records(path)
    requests = []
    for lineno, item in enumerate(items, 1):
        where = f"dataset {path} record {lineno}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        ids = _token_ids(item.get("prompt_token_ids"))
        if ids is None:
            raise ValueError(f"{where}: 'prompt_token_ids' must be a non-empty list of non-negative ints")
        max_tokens, eos = _budget(item, where, None, ignore_eos)
        requests.append(Request(prompt=ids, max_tokens=max_tokens, input_tokens=len(ids), ignore_eos=eos))
    if not requests:
        raise ValueError(f"dataset {path} holds no requests")
    return requests


def prompt_file_dataset(path: str | Path, max_tokens: int, ignore_eos: bool = False,
                        tokenizer: "PromptTokenizer | None" = None) -> list[Request]:
    """Text prompts as a JSON array or JSONL file lists them: each record a string, or ``{"prompt": "...",
    "max_tokens"?: N, "ignore_eos"?: bool}`` (``max_tokens`` / ``ignore_eos`` otherwise). Nothing is skipped,
    reordered or made unique: the file is the workload, so a prompt listed twice is sent twice (a declared
    replay; the audit counts its prefix-cache hits). ``input_tokens`` is exact with the model's ``tokenizer``
    (its special tokens included, as the server counts), else the word count."""
    requests = []
    for n, item in enumerate(_read_records(path), 1):
        where = f"dataset {path} record {n}"
        rec = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise ValueError(f"{where}: expected a non-empty string or an object with a 'prompt' string")
        budget, eos = _budget(rec, where, max_tokens, ignore_eos)
        text = rec["prompt"]
        length = (len(tokenizer.encode(text)) + tokenizer.specials) if tokenizer is not None else len(text.split())
        requests.append(Request(prompt=text, max_tokens=budget, input_tokens=max(1, length), ignore_eos=eos))
    if not requests:
        raise ValueError(f"dataset {path} holds no requests")
    return requests


# -- text tasks ---------------------------------------------------------------------------------------------

# What each task asks, and how much of the source its answer is expected to hold (the output budget, in
# words of the source: ~1.3 tokens each, so the answer ends while it is still reusing the input).
# task -> (passage kind or None for free writing, the ask, the answer's lead-in, output budget as a share of
# the passage's words)
TEXT_TASKS: dict[str, tuple[str | None, str | None, str, float]] = {
    "rewrite": ("prose", "Rewrite the following passage in plain modern English, keeping every sentence and "
                         "its order.", "Rewritten passage:\n```\n", 1.0),
    "summarize": ("prose", "Summarize the following passage in a few sentences, quoting its key phrases.",
                  "Summary:\n", 0.5),
    "code_edit": ("code", None, "Edited code:\n```python\n", 1.0),
    "freeform": (None, None, "", 0.0),  # no passage: the budget is output_tokens
}
COPY_TASKS = ("rewrite", "summarize", "code_edit")


def text_corpus() -> dict[str, Any]:
    """The shipped passages (prose and code, each with its source and licence) and free-writing topics."""
    text = (resources.files("servetune.loadgen") / "data" / "text_tasks.json").read_text(encoding="utf-8")
    return json.loads(text)


def prose_text() -> str:
    """The shipped prose passages as one text (what English reads like to a tokenizer; loadgen.tokenizer)."""
    return " ".join(p["text"] for p in text_corpus()["passages"] if p["kind"] == "prose")


def text_task_dataset(
    n: int,
    tasks: Iterable[str] = COPY_TASKS,
    output_tokens: int = 256,
    seed: int = 0,
    ignore_eos: bool = True,
) -> list[Request]:
    """``n`` prompts cycling through ``tasks`` over the shipped corpus, in a seeded order.

    Copy tasks quote their source between ``` fences and ask for an answer that reuses it; the output budget
    is the source's length in words (half for ``summarize``), capped at ``output_tokens``. ``freeform`` asks
    for new writing on a topic with ``output_tokens``. Each prompt starts with its own request number, so no
    two prompts share a prefix-cache block."""
    tasks = list(tasks)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unknown = [t for t in tasks if t not in TEXT_TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks must be some of {', '.join(TEXT_TASKS)}; got {tasks}")
    if output_tokens < 1:
        raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
    corpus = text_corpus()
    samples: list[tuple[str, int, int]] = []  # (prompt body, max_tokens, words)
    for task in tasks:
        kind, ask, lead, share = TEXT_TASKS[task]
        if kind is None:
            for topic in corpus["topics"]:
                samples.append((f"{topic}\n\n", output_tokens, len(topic.split())))
            continue
        for p in corpus["passages"]:
            if p["kind"] != kind:
                continue
            fence = "```python" if kind == "code" else "```"
            body = (f"{ask or p['edit']}\n\n{fence}\n{p['text'].rstrip()}\n```\n\n{lead}")
            budget = max(1, min(output_tokens, int(len(p["text"].split()) * share)))
            samples.append((body, budget, len(body.split())))
    order = np.random.default_rng(seed).permutation(len(samples))
    requests = []
    for i in range(n):
        body, budget, words = samples[int(order[i % len(samples)])]
        prompt = f"Request {i + 1}.\n{body}"
        requests.append(Request(prompt=prompt, max_tokens=budget, input_tokens=words + 2, ignore_eos=ignore_eos))
    return requests


def with_temperature(requests: list[Request], temperature: float | None) -> list[Request]:
    """The requests with a sampling temperature (None: the server's default)."""
    if temperature is None:
        return requests
    return [replace(r, temperature=float(temperature)) for r in requests]
