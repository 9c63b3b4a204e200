"""The model's own tokenizer, so that prompts have an exact token length in text and in token ids alike.

Real clients send text, and the server's tokenization is part of the TTFT they see. A model directory
(what vLLM and SGLang load) holds ``tokenizer.json``, the Hugging Face ``tokenizers`` format. With it a
random prompt is token ids decoded to text, and the text is encoded again to check its length, as vLLM's
random dataset does. Ids are drawn from the vocabulary's short words: tokens that decode to a space and
a few letters and encode back to themselves alone (short, so that a prompt costs the server's
tokenizer what real text of the same token count costs: see :meth:`PromptTokenizer._word_chars`).
Byte-level BPE (Llama-3, Qwen, GPT) and SentencePiece-style pre-tokenizers split text at those spaces, so a
sequence of such tokens decodes to text that encodes to the same sequence: the length is exact without rounds
of trimming (random ids of any kind decode to broken UTF-8 and merges across token boundaries, which vLLM
trims and tops up for ten rounds and still misses).
A prompt whose text does not encode back exactly is trimmed or topped up until it does.

The server adds its special tokens to a text prompt (Llama: one BOS); :attr:`PromptTokenizer.specials`
counts them, and a token-id prompt of the same words carries them itself, so a text prompt and a token-id
prompt built from the same ids are the same tokens to the server, and "1024 input tokens" means 1024 in
the server's own ``prompt_tokens`` counter either way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from servetune.loadgen.datasets import prose_text

TOKENIZER_FILE = "tokenizer.json"
ROUNDS = 10  # trim / top-up rounds for a text that does not encode back exactly (vLLM: 10)
MIN_WORDS = 256  # fewer word tokens than this: draw from the whole regular vocabulary instead


def find_tokenizer(path: str | Path | None) -> Path | None:
    """``tokenizer.json`` of a model directory (or the file itself); None when there is none."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE
    return p if p.is_file() and p.suffix == ".json" else None


class PromptTokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` package (what ``transformers`` uses underneath)."""

    def __init__(self, path: str | Path) -> None:
        file = find_tokenizer(path)
        if file is None:
            raise ValueError(f"no {TOKENIZER_FILE} at {path}: give a model directory that holds one, or the file")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises its own Exception types for a bad file
            raise ValueError(f"cannot read tokenizer {file}: {e}") from None
        self.path = str(file)
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: >= 0.21
        added = set(self._tok.get_added_tokens_decoder())
        # Never special or reserved tokens (BOS, EOS, chat markers, fillers): they end a request early or
        # change how the server reads the prompt.
        regular = np.array(sorted(set(self._tok.get_vocab(with_added_tokens=False).values()) - added))
        if regular.size < 2:
            raise ValueError(f"tokenizer {file} has no regular vocabulary to draw prompts from")
        words, chars = self._words(regular)
        self.pool = words[chars <= self._word_chars(chars)] if words.size >= MIN_WORDS else regular
        probe = self._tok.encode("probe text", add_special_tokens=True).ids
        bare = self._tok.encode("probe text", add_special_tokens=False).ids
        k = next((i for i in range(len(probe) - len(bare) + 1) if probe[i:i + len(bare)] == bare), 0)
        self.leading, self.trailing = probe[:k], probe[k + len(bare):]
        self.specials = len(self.leading) + len(self.trailing)  # what the server adds to a text prompt

    def _words(self, regular: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The regular ids that decode to a space and letters, and encode back to themselves alone, with the
        length of their text."""
        texts = self._tok.decode_batch([[int(i)] for i in regular], skip_special_tokens=False)
        cand = [(int(i), t) for i, t in zip(regular, texts) if len(t) > 1 and t[0] == " " and t[1:].isalpha()]
        enc = self._encode_batch([t for _, t in cand], add_special_tokens=False) if cand else []
        kept = [(i, len(t)) for (i, t), e in zip(cand, enc) if e.ids == [i]]
        return np.array([i for i, _ in kept], dtype=int), np.array([n for _, n in kept], dtype=int)

    def _word_chars(self, chars: np.ndarray) -> int:
        """The longest word (in characters, its space included) the pool keeps: the one that gives prompts
        the characters per token this tokenizer makes of English prose.

        The server tokenizes a text prompt on the request's path, in time that grows with its characters.
        Drawn from every word token, prompts had 7.7-9.5 characters per token where prose has 4.1-4.6, and
        cost a Llama-3-shaped tokenizer 1.6-2.6x what vLLM's random dataset costs
        (benchmarks/prompt_tokenization.py): a TTFT gap in any cross-check that is not the engine's."""
        prose = prose_text()
        target = len(prose) / max(1, len(self.encode(prose)))
        fits = [(abs(float(chars[chars <= n].mean()) - target), n) for n in np.unique(chars)
                if np.count_nonzero(chars <= n) >= MIN_WORDS]
        return min(fits)[1]

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without special tokens (the server adds those)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def with_specials(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as the server holds them after tokenizing their text: with its special tokens."""
        return [*self.leading, *ids, *self.trailing]

    def prompts(self, rows: Sequence[Sequence[int] | np.ndarray],
                rng: np.random.Generator) -> tuple[list[str], list[list[int]]]:
        """Per row of ids: a text, and the ids that text encodes to (the row itself unless it had to be
        trimmed or topped up; after :data:`ROUNDS` rounds a text keeps the length it has)."""
        want = [len(r) for r in rows]
        texts = self._tok.decode_batch([[int(t) for t in r] for r in rows], skip_special_tokens=False)
        final = [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]
        todo = [i for i in range(len(rows)) if len(final[i]) != want[i]]
        for _ in range(ROUNDS):
            if not todo:
                break
            fixed = []
            for i in todo:
                ids = final[i]
                fixed.append(ids[:want[i]] if len(ids) > want[i] else
                             ids + self.pool[rng.integers(0, self.pool.size, size=want[i] - len(ids))].tolist())
            new_texts = self._tok.decode_batch(fixed, skip_special_tokens=False)
            for i, text, enc in zip(todo, new_texts, self._encode_batch(new_texts, add_special_tokens=False)):
                texts[i], final[i] = text, enc.ids
            todo = [i for i in todo if len(final[i]) != want[i]]
        return texts, final
