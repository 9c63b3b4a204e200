"""The sim's stand-in for a language model's numbers: deterministic greedy tokens with top-K logprobs.

Only requests that ask for ``logprobs`` (a quality evaluation) read this; load requests keep their filler text.
Each position's logits are a seeded function of the prompt and the tokens generated before it, so two launches
of the same configuration answer identically, like one checkpoint at one precision. A lossy setting adds its
own seeded noise to the logits (``drift``: name -> standard deviation): greedy choices near a tie flip, and
after the first flip the contexts differ, as with a quantized model. The noise of one setting is the same on
every launch, so the drift a quality check measures depends on the settings, never on the run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

VOCAB = tuple(" " + w for w in (
    "the of and to in is was that for it with as his on be at by had are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after").split())
# The clean logits: N(0, LOGIT_SCALE) per token, the best one lifted by an Exp(TOP_MARGIN) margin. The top token
# then holds about 60 % of the mass on average, and near-ties are as rare as a drift of 0.1 flipping about one
# 32-token greedy continuation in ten (0.3: one in two).
LOGIT_SCALE = 1.5
TOP_MARGIN = 3.0


@dataclass
class Completion:
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def _rng(*parts: str) -> np.random.Generator:
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def greedy(prompt: str, max_tokens: int, top_k: int, drift: dict[str, float] | None = None) -> Completion:
    """``max_tokens`` greedy tokens after ``prompt``, each with its logprob and the ``top_k`` best."""
    top_k = max(1, min(top_k, len(VOCAB)))
    noise = {name: sd for name, sd in (drift or {}).items() if sd > 0}
    out = Completion()
    for _ in range(max_tokens):
        context = prompt + "\x00" + "".join(out.tokens)
        rng = _rng("logits", context)
        logits = rng.normal(0.0, LOGIT_SCALE, len(VOCAB))
        logits[int(np.argmax(logits))] += rng.exponential(TOP_MARGIN)
        for name in sorted(noise):
            logits = logits + _rng(name, context).normal(0.0, noise[name], len(VOCAB))
        m = logits.max()
        lp = logits - (m + np.log(np.exp(logits - m).sum()))
        order = np.argsort(-lp, kind="stable")[:top_k]
        best = int(order[0])
        out.tokens.append(VOCAB[best])
        out.token_logprobs.append(float(lp[best]))
        out.top_logprobs.append({VOCAB[int(i)]: float(lp[int(i)]) for i in order})
    return out
