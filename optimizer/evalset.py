"""The prompts a quality check sends: the evaluation set (compared with the baseline) and optional tasks
(scored against expected answers). Both are JSONL, one object per line:

- evaluation set: ``{"prompt": "...", "id": "...", "max_tokens": 32, "category": "..."}`` (only prompt needed)
- tasks (lm-evaluation-harness style): ``{"prompt": "Q: ...\\nA:", "answer": "Paris"}``; ``answer`` may be a
  list of accepted answers

``builtin`` names the set shipped with servetune (``search_spaces/eval/general.jsonl``: 64 prompts of facts,
arithmetic, short instructions, openings of public-domain prose and code, written for this project), and
``builtin:facts`` the shipped task file. Nothing is downloaded. A bad line raises :class:`EvalSetError` with
``FILE:LINE: message``.
"""
from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

BUILTIN = {"builtin": "general.jsonl", "builtin:general": "general.jsonl", "builtin:facts": "facts.jsonl"}


class EvalSetError(ValueError):
    pass


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    kind: str  # "compare": judged against the baseline's output | "task": scored against answers
    max_tokens: int
    answers: tuple[str, ...] = field(default=())
    category: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(source: str, base_dir: str | None) -> tuple[str, str]:
    """(name for messages, file content) of a builtin set or a file."""
    if source in BUILTIN:
        name = BUILTIN[source]
        return f"{source} (search_spaces/eval/{name})", \
            (resources.files("servetune.search_spaces") / "eval" / name).read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir:
        path = Path(base_dir) / path
    try:
        return source, path.read_text(encoding="utf-8")
    except FileNotFoundError:
        looked = f" (looked in {path})" if str(path) != source else ""
        raise EvalSetError(f"{source}:1: no such file{looked}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalSetError(f"{source}:1: cannot read it: {e}") from None


def load(source: str, kind: str, max_tokens: int, base_dir: str | None = None) -> list[EvalItem]:
    """The items of an evaluation set (``kind`` "compare") or a task file (``kind`` "task")."""
    name, text = _text(source, base_dir)
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    stem = Path(name.split(" ")[0]).stem.replace("builtin:", "") or "item"
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalSetError(f"{name}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(d, dict):
            raise EvalSetError(f"{name}:{n}: each line is a JSON object with a prompt")
        prompt = d.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalSetError(f"{name}:{n}: prompt: a non-empty text is needed")
        mt = d.get("max_tokens", max_tokens)
        if not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= 4096:
            raise EvalSetError(f"{name}:{n}: max_tokens: a whole number from 1 to 4096, got {mt!r}")
        answers: tuple[str, ...] = ()
        if kind == "task":
            a = d.get("answer", d.get("answers"))
            a = [a] if isinstance(a, str) else a
            if not isinstance(a, list) or not a or not all(isinstance(x, str) and normalize(x) for x in a):
                raise EvalSetError(f"{name}:{n}: answer: the expected answer (text, or a list of accepted "
                                   "texts) is needed, with words left after normalization")
            answers = tuple(a)
        iid = str(d.get("id") or f"{stem}-{n}")
        if iid in seen:
            raise EvalSetError(f"{name}:{n}: id {iid!r} is used twice (first at line {seen[iid]})")
        seen[iid] = n
        items.append(EvalItem(id=iid, prompt=prompt, kind=kind, max_tokens=mt, answers=answers,
                              category=str(d.get("category") or "")))
    if not items:
        raise EvalSetError(f"{name}:1: no prompts in it")
    return items


def fingerprint(items: list[EvalItem], settings: dict[str, Any]) -> str:
    """Identifies what was asked: two evaluations compare only when their fingerprints are equal."""
    blob = json.dumps([settings, [i.to_dict() for i in items]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def normalize(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD-style)."""
    t = "".join(" " if c in string.punctuation else c for c in text.lower())
    return " ".join(w for w in t.split() if w not in ("a", "an", "the"))


def correct(output: str, answers: tuple[str, ...] | list[str], match: str = "contains") -> bool:
    """Whether a task's output gives one of its answers: ``exact`` compares the first non-empty line,
    ``contains`` finds the answer as whole words anywhere in the output (both after :func:`normalize`)."""
    if match == "exact":
        first = next((ln for ln in output.splitlines() if ln.strip()), "")
        got = normalize(first)
        return any(got == normalize(a) for a in answers)
    got = f" {normalize(output)} "
    return any(f" {normalize(a)} " in got for a in answers)
