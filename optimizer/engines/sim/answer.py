"""What the sim "model" answers, token by token, and how a draft-free speculator guesses it.

Speculative decoding by prompt lookup pays only when the answer repeats its context, so the sim's answer has
to have content for the drafts to be judged against. The sim's model is simple and stated here:

* a prompt that quotes a source between ``` fences (a rewrite, summary or code edit, as the ``text_tasks``
  dataset builds them) is answered by copying that source in order, each word replaced by a filler word with
  probability ``edit_rate`` (the rewrite's edits); once the source is used up, the answer goes on in filler;
* any other prompt (free writing, random words, token ids) is answered with filler words drawn at random.

Drafts are proposed the way vLLM 0.26 does (``vllm/v1/spec_decode/ngram_proposer.py``): the longest n-gram,
``lookup_min <= n <= lookup_max``, that ends the context (prompt + answer so far) and occurred earlier in it;
the draft is the k tokens after its earliest occurrence. ``suffix`` decoding is modelled on the same
per-request match (depth up to :data:`SUFFIX_DEPTH`) speculating adaptively, as many tokens as the match is
long (Arctic Inference's ``max_spec_factor`` 1); its cross-request tree is not modelled. A draft is accepted
up to its first token that differs from the answer, so acceptance is measured, never assumed: copy tasks
accept long runs, free writing almost nothing.
"""
from __future__ import annotations

import json
import random
import zlib
from typing import Any, Sequence

# Vocabulary of the filler the sim writes where it does not copy: wide enough that a random two-word
# sequence rarely repeats (drafts on free writing are then rarely accepted, as on a real model).
FILLER_WORDS = tuple(
    """able about above across act add after again against age ago air all almost alone along already also
    always among amount and animal answer any appear apple area arm around art ask away baby back bad bag ball
    bank base basket bear beat beauty bed bell belt bench best better between bird black blade blanket blue
    board boat body bone book border bottle bottom box boy brain branch bread bridge bright bring broad brother
    brown brush bucket build burn busy butter cake call calm camera candle card care carry castle cat cause
    center chain chair chalk change cheap cheese chest chief child circle city clean clear clock cloth cloud
    coast coat coffee cold color comb common copper corner cotton country cover cow crowd cup curtain cushion
    dance dark daughter day deep desk dinner dish dog door dream dress drink drop dust early earth east edge
    egg engine evening event eye face fact family farm father feather field finger fire fish flag flat floor
    flower fog food foot forest fork friend frog fruit garden gate gift girl glass glove goat gold grass green
    grey ground group guide hair hall hammer hand harbor hat heart heavy hill hole honey hook horse hour house
    ice idea island jacket jewel journey judge key kettle kind king kitchen knee knife lake lamp land leaf
    letter library light line lion list lock long machine map market meadow metal milk mirror moon morning
    mother mountain music nail name narrow needle nest night noise north nose note ocean office oil orange
    oven page paint paper parcel path pen pencil picture pig pin pipe plane plant plate pocket pond pot
    potato powder prison pump queen rabbit rain river road rock roof room root rope rose round sail salt sand
    school scissors sea seed sheep shelf ship shirt shoe shop silver sister sky sleep slope smoke snake snow
    soap sock song sound soup south space spoon spring square stage stamp star station steam stem stick stone
    storm story street string sugar summer sun table tail teacher thread thumb ticket tiger time toe tongue
    tooth town train tree truck umbrella valley voice wagon wall watch water wave wheel whistle window wine
    wing winter wire wood wool word yard yellow""".split())
FENCE = "```"
GROW = 32
DEFAULT_EDIT_RATE = 0.1
SUFFIX_DEPTH = 8  # Arctic Inference's tree goes to 24; the sim indexes 8 (longer matches draft the same)


_ESCAPED: dict[str, str] = {}


def _escaped(tok: Any) -> str:
    """`` tok`` as the inside of a JSON string (cached: answers repeat their words)."""
    key = str(tok)
    e = _ESCAPED.get(key)
    if e is None:
        e = json.dumps(" " + key, ensure_ascii=False)[1:-1]
        if len(_ESCAPED) < 100_000:
            _ESCAPED[key] = e
    return e


def prompt_seed(prompt: Sequence[Any], seed: int) -> int:
    """A request's answer seed from its prompt: one prompt gets one answer, whatever the configuration (the
    sim stays lossless under speculation, as a real engine's greedy decoding is)."""
    return zlib.crc32(" ".join(map(str, prompt)).encode("utf-8", "replace")) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def find_source(prompt: Sequence[Any]) -> list[Any]:
    """The words between the prompt's first two fence words (```, ```python, ...); [] when none."""
    start = None
    for i, w in enumerate(prompt):
        if isinstance(w, str) and w.startswith(FENCE):
            if start is None:
                start = i + 1
            else:
                return list(prompt[start:i])
    return []


class Answer:
    """One request's answer (generated lazily, deterministic in the seed) and its draft index."""

    __slots__ = ("source", "edit_rate", "rng", "tokens", "context", "first", "lo", "hi", "texts", "emitted")

    def __init__(self, prompt: Sequence[Any], seed: int, edit_rate: float = DEFAULT_EDIT_RATE,
                 lookup: tuple[int, int] | None = None):
        """``lookup`` (min, max n-gram length) indexes the context for drafts; None: no drafts asked."""
        self.source = find_source(prompt)
        self.edit_rate = edit_rate
        self.rng = random.Random(seed)
        self.tokens: list[Any] = []  # the answer, as far as generated
        self.texts: list[str] = []  # each answer token as JSON-string-escaped text with its leading space
        self.lo, self.hi = (max(1, lookup[0]), max(lookup[0], lookup[1], 1)) if lookup else (1, 0)
        self.context: list[Any] = []  # prompt + answer tokens emitted so far
        self.first: dict[tuple, int] = {}  # n-gram -> start of its earliest occurrence in the context
        self.emitted = 0
        if lookup:
            for tok in prompt:
                self._append(tok)

    # -- the answer -------------------------------------------------------------------------------------
    def _grow(self, upto: int) -> None:
        upto = max(upto, len(self.tokens) + GROW)  # ahead in chunks: the answer is fixed by the seed anyway
        rng, src, tokens, texts, edit = self.rng, self.source, self.tokens, self.texts, self.edit_rate
        nsrc, nfill = len(src), len(FILLER_WORDS)
        for i in range(len(tokens), upto):
            tok = src[i] if i < nsrc and rng.random() >= edit else FILLER_WORDS[rng.randrange(nfill)]
            tokens.append(tok)
            texts.append(_escaped(tok))

    def token(self, i: int) -> Any:
        if i >= len(self.tokens):
            self._grow(i + 1)
        return self.tokens[i]

    def text(self, start: int, n: int) -> str:
        """Answer tokens [start, start+n) as streamed text (already escaped for a JSON string)."""
        if start + n > len(self.tokens):
            self._grow(start + n)
        return "".join(self.texts[start:start + n])

    # -- the context and its drafts ---------------------------------------------------------------------
    def _append(self, tok: Any) -> None:
        ctx = self.context
        ctx.append(tok)
        end = len(ctx)
        first = self.first
        for n in range(self.lo, min(self.hi, end) + 1):
            first.setdefault(tuple(ctx[end - n:]), end - n)

    def advance(self, emitted: int) -> None:
        """The request emitted ``emitted`` more answer tokens: they join the context."""
        start = self.emitted
        self.emitted = start + emitted
        if self.hi:
            if self.emitted > len(self.tokens):
                self._grow(self.emitted)
            for tok in self.tokens[start:self.emitted]:
                self._append(tok)

    def propose(self, k: int, adaptive: bool = False) -> list[Any]:
        """Up to ``k`` draft tokens: what followed the earliest earlier occurrence of the longest n-gram
        that ends the context; with ``adaptive`` (suffix decoding), at most as many as the match is long."""
        ctx, first = self.context, self.first
        end = len(ctx)
        for n in range(min(self.hi, end - 1), self.lo - 1, -1):
            s = first.get(tuple(ctx[end - n:]))
            if s is not None and s < end - n:
                start = s + n
                return ctx[start:start + min(k, n if adaptive else k)]
        return []
