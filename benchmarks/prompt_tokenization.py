"""What a random prompt costs the server to tokenize: servetune's text prompts against vLLM's random dataset
and against real text of the same token count.

A text prompt is tokenized by the server before prefill, on the request's path, so it is part of the TTFT a
client sees, and under a burst of arrivals the front end tokenizes one prompt after another. Two random
prompts of 1024 tokens can differ in characters per token, and so in encode time: that difference shows up in
a cross-check against ``vllm bench serve`` as a TTFT gap that has nothing to do with the engine's config.

For one ``tokenizer.json`` this prints, per prompt kind: characters per token, and the median time of one
``encode`` of a 1024-token prompt (the ``tokenizers`` Rust code that vLLM's and SGLang's fast tokenizers run), and,
where transformers is installed, of the call vLLM's front end makes through transformers' wrapper.
Kinds:
  servetune   loadgen.tokenizer.PromptTokenizer.prompts (word tokens drawn from its pool of short words)
  all-words   the same drawn from every word token (servetune before 2026-12-05)
  vllm-random vLLM's RandomDataset: consecutive ids from a random offset, decoded, re-encoded and trimmed /
              topped up for up to ten rounds (vllm/benchmarks/datasets.py, gen_prompt_decode_to_target_len)
  real-text   the prose passages shipped in loadgen/data/text_tasks.json, cut into windows of the same length

Run: ``python benchmarks/prompt_tokenization.py TOKENIZER_JSON [TOKENIZER_JSON ...]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from servetune.loadgen.datasets import prose_text
from servetune.loadgen.tokenizer import ROUNDS, PromptTokenizer


def vllm_random(tok: Tokenizer, n: int, length: int, rng: np.random.Generator) -> list[str]:
    special = set(tok.get_added_tokens_decoder())
    vocab = tok.get_vocab_size()
    allowed = np.array([i for i in range(vocab) if i not in special])
    out = []
    for i, off in enumerate(rng.integers(0, vocab, size=n)):
        seq = ((off + i + np.arange(length)) % vocab).tolist()
        for _ in range(ROUNDS + 1):
            text = tok.decode(seq, skip_special_tokens=False)
            seq = tok.encode(text, add_special_tokens=False).ids
            if len(seq) == length:
                break
            seq = seq[:length] if len(seq) > length else seq + rng.choice(allowed, length - len(seq)).tolist()
        out.append(text)
    return out


def real_text(tok: Tokenizer, n: int, length: int) -> list[str]:
    prose = prose_text()
    enc = tok.encode(prose, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    out = []
    for k in range(n):  # windows that wrap around the corpus, each starting at another token
        start = (k * 97) % len(ids)
        if start + length <= len(ids):
            out.append(prose[offsets[start][0]:offsets[start + length - 1][1]])
        else:
            rest = prose[offsets[start][0]:]
            out.append(rest + " " + prose[:offsets[length - (len(ids) - start) - 1][1]])
    return out


def encode_ms(encode: Callable[[str], object], prompts: list[str], reps: int) -> float:
    """Median CPU time of one encode: thread CPU time, so that other work on a busy machine does not count."""
    times = []
    for _ in range(reps):
        for p in prompts:
            t0 = time.thread_time()
            encode(p)
            times.append(time.thread_time() - t0)
    return 1e3 * statistics.median(times)


def hf_encoder(path: str) -> Callable[[str], object] | None:
    """What vLLM's front end runs on a text prompt, where transformers is installed: the tokenizer's call through
    transformers, with the arguments of vLLM 0.26's renderer (``renderers/base.py`` ``_tokenize_prompt``,
    ``params.py`` ``get_encode_kwargs``: truncation at the longest input + 1, special tokens added). It goes through
    ``encode_batch``, and its cost per prompt kind is not the plain ``encode``'s: on the kit's tokenizer vLLM's
    random prompts cost 1.7x servetune's through it, and about the same through ``encode``."""
    try:
        from transformers import AutoTokenizer  # noqa: PLC0415 — optional: not a servetune dependency
    except ImportError:
        return None
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    hf = AutoTokenizer.from_pretrained(str(folder))
    longest = int(min(hf.model_max_length, 1 << 20))
    return lambda p: hf(p, truncation=True, max_length=longest + 1, add_special_tokens=True)


def measure(path: str, n: int, length: int, reps: int, seed: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    pt = PromptTokenizer(path)
    tok = Tokenizer.from_file(pt.path)
    rows = [pt.pool[rng.integers(0, pt.pool.size, size=length)].tolist() for _ in range(n)]
    words = pt._words(np.arange(tok.get_vocab_size()))[0]
    all_rows = [words[rng.integers(0, words.size, size=length)].tolist() for _ in range(n)]
    kinds = {"servetune": pt.prompts(rows, rng)[0], "all-words": pt.prompts(all_rows, rng)[0],
             "vllm-random": vllm_random(tok, n, length, rng),
             "real-text": real_text(tok, n, length)}
    hf = hf_encoder(path)
    res: dict[str, dict[str, float]] = {}
    for _ in range(2):  # interleaved passes: a busy machine slows every kind alike
        for name, prompts in kinds.items():
            tokens = [len(tok.encode(p, add_special_tokens=False).ids) for p in prompts]
            r = res.setdefault(name, {"chars_per_token": sum(map(len, prompts)) / sum(tokens),
                                      "mean_tokens": sum(tokens) / len(tokens)})
            timed: dict[str, Callable[[str], object]] = {"encode_ms": lambda p: tok.encode(p, add_special_tokens=True)}
            if hf is not None:
                timed["hf_call_ms"] = hf
            for key, fn in timed.items():
                ms = encode_ms(fn, prompts, reps)
                r[key] = min(ms, r.get(key, ms))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokenizers", nargs="+", help="tokenizer.json files or model directories")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    allres = {}
    for path in a.tokenizers:
        res = measure(path, a.prompts, a.tokens, a.reps, a.seed)
        allres[path] = res
        print(f"\n{path}  ({a.prompts} prompts of {a.tokens} tokens, median encode of {a.reps} passes)")
        hf = "hf_call_ms" in res["vllm-random"]
        print(f"{'kind':<12} {'chars/token':>11} {'tokens':>8} {'encode ms':>10} {'vs vllm-random':>15}"
              + (f" {'transformers ms':>16} {'vs vllm-random':>15}" if hf else ""))
        for name, r in res.items():
            ratio = r["encode_ms"] / res["vllm-random"]["encode_ms"]
            line = (f"{name:<12} {r['chars_per_token']:>11.2f} {r['mean_tokens']:>8.1f} {r['encode_ms']:>10.3f}"
                    f" {ratio:>14.2f}x")
            if hf:
                line += f" {r['hf_call_ms']:>16.3f} {r['hf_call_ms'] / res['vllm-random']['hf_call_ms']:>14.2f}x"
            print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(allres, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
