"""The study file's error engine: problems as ``FILE:LINE: path.to.key: message`` lines.

It maps YAML key paths to lines, finds duplicate and non-name keys PyYAML would accept silently, and turns
pydantic's errors into one plain sentence each (with "did you mean" and the allowed range of a number).
The schema modules raise located errors through :func:`fail`; :func:`validation_lines` places them.
"""
from __future__ import annotations

import datetime
import difflib
import math
import re
import typing
from typing import Any, Callable, Mapping

import annotated_types as at
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


def fail(title: str, errors: list[tuple[tuple, str]]) -> None:
    """Raise a ValidationError whose errors sit at ``loc`` (relative to the model being validated)."""
    raise ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("spec", "{msg}", {"msg": msg}), loc=tuple(loc), input=None)
        for loc, msg in errors
    ])


def close_match(word: Any, choices: Any) -> str | None:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: Any, choices: Any) -> str:
    close = close_match(word, choices)
    return f" (did you mean {close!r}?)" if close else ""


def did_you_mean_or_list(word: Any, choices: Any) -> str:
    return did_you_mean(word, choices) or f" (known: {', '.join(str(c) for c in choices)})"


def describe(v: Any) -> str:
    if v is None:
        return "nothing (an empty value)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if v != v else (".inf" if v > 0 else "-.inf")  # as YAML spells them
    if isinstance(v, (datetime.date, datetime.datetime)):
        return f"a date ({v.isoformat()}; quote it if you mean the text)"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def a_word(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


class SpecError(Exception):
    """A study file that cannot be used; ``lines`` are ready to print (one problem per line)."""

    def __init__(self, lines: list[str]):
        lines = [re.sub(r"[ ]*[\r\n\t\v\f]+[ ]*", " ", str(x)).strip() for x in lines]
        super().__init__("\n".join(lines))
        self.lines = lines


# -- loading with line numbers ------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


def structure_errors(root: yaml.Node) -> list[tuple[int, tuple, str]]:
    """Duplicate keys (PyYAML silently keeps the last) and keys that are not names, from the node tree."""
    errs: list[tuple[int, tuple, str]] = []
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                line = k.start_mark.line + 1
                if k.tag == _MERGE_TAG:
                    continue
                if not isinstance(k, yaml.ScalarNode):
                    errs.append((line, path, "a key must be a plain name, not a list or mapping"))
                    continue
                kp = path + (k.value,)
                if k.tag != _STR_TAG:
                    kind = k.tag.rsplit(":", 1)[-1]
                    kind = {"bool": "true/false", "int": "a number", "float": "a number", "null": "null",
                            "timestamp": "a date"}.get(kind, kind)
                    errs.append((line, kp, f"the key {k.value!r} is read as {kind}, not a name; quote it "
                                           f"(\"{k.value}\":) if you mean the text"))
                if k.value in first:
                    errs.append((line, kp, f"duplicate key {k.value!r} (first at line {first[k.value]}); "
                                           "YAML would silently keep only this last one"))
                else:
                    first[k.value] = line
                walk(v, kp)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    walk(root, ())
    return errs


def line_map(node: yaml.Node, path: tuple = (), out: dict | None = None,
             _stack: frozenset = frozenset()) -> dict[tuple, int]:
    """Map every key path in the YAML document to its 1-based line (keys point at the key's line)."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in _stack:  # a recursive alias
        return out
    stack = _stack | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                continue
            kp = path + (k.value,)
            line_map(v, kp, out, stack)
            out[kp] = k.start_mark.line + 1  # later keys (overrides of a merge) win
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            line_map(v, path + (i,), out, stack)
    return out


def nearest_line(lines: dict[tuple, int], loc: tuple) -> int:
    loc = tuple(loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def clean_loc(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's union/validator tags so the path matches the YAML."""
    out: list[Any] = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(part, str) and not isinstance(cur, (dict, list)):
            continue  # e.g. 'list[any]', 'function-after[...]' tags on a scalar
        elif isinstance(cur, dict) and isinstance(part, str) and "[" not in part:
            out.append(part)  # a missing or extra key: keep it, it names the problem
            cur = None
    return tuple(out)


_SCALAR_TAGS = ("float", "int", "str", "bool", "constrained-float", "constrained-int", "constrained-str")


def wrong_branch(loc: tuple, data: Any) -> bool:
    """Whether a pydantic error's location passes through a union branch of another shape than the input:
    the list branch for a scalar, a scalar branch for a list."""
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        elif isinstance(part, str):
            if part.startswith("list[") and not isinstance(cur, list):
                return True
            if part in _SCALAR_TAGS and isinstance(cur, (list, dict)):
                return True
        else:
            return False
    return False


def fmt_path(loc: tuple) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "(top level)"


def allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at the parent of ``loc`` (for "did you mean")."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cur = model_in(ann)
        if cur is None:
            return []
    return [k for k, f in getattr(cur, "model_fields", {}).items() if not f.exclude]  # not `source`: internal


def model_in(ann: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``X``, ``X | None``, ``list[X]``...), or None."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = model_in(a)
        if m is not None:
            return m
    return None


_TYPE_WORDS = {
    "string_type": "expected text", "int_type": "expected a whole number", "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number", "float_type": "expected a number",
    "float_parsing": "expected a number", "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list", "dict_type": "expected a mapping (key: value lines)",
    "model_type": "expected a mapping (key: value lines)",
    "model_attributes_type": "expected a mapping (key: value lines)",
}


def message(err: Mapping[str, Any], model: type[BaseModel], loc: tuple | None = None) -> str:
    """A pydantic error as one plain sentence, with what was given (and the allowed range of a number, found
    from the field at ``loc`` of ``model``)."""
    t, msg, given = err["type"], err["msg"], err.get("input")
    if t == "spec":
        return msg
    if t == "value_error":
        return msg.removeprefix("Value error, ")
    span = _field_range(model, tuple(err["loc"] if loc is None else loc))
    if t in ("int_type", "int_parsing", "int_from_float", "float_type", "float_parsing") and span:
        kind = "a whole number" if t.startswith("int") else "a number"
        as_text = ""
        if isinstance(given, str) and _parses_as_number(given):
            as_text = (f": YAML reads {given} as text (write the digits, or a decimal point and a signed "
                       "exponent: 1.0e+6)")
        return f"expected {kind} {span}, got {describe(given)}{as_text}"
    if t in _TYPE_WORDS:
        return f"{_TYPE_WORDS[t]}, got {describe(given)}"
    if t == "literal_error":
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        return f"{describe(given)} is not one of: {', '.join(choices)}{did_you_mean(given, choices)}"
    if t == "too_short":
        return "needs at least one entry"
    if t == "string_pattern_mismatch" and tuple(err["loc"])[-1:] == ("name",):
        names = ("the run directory and the Optuna study" if len(err["loc"]) == 1
                 else "the scenario's request files and report columns")
        return (f"{describe(given)} is not a usable name: letters, digits, '.', '_' and '-' only, starting "
                f"with a letter or digit (it names {names})")
    if t == "string_too_long":
        limit = (err.get("ctx") or {}).get("max_length")
        return f"is {len(str(given))} characters long; at most {limit} (got {describe(given)})"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        if span:
            return f"must be {'a finite number ' if t == 'finite_number' else ''}{span} (got {describe(given)})"
        return f"{msg.replace('Input should be', 'should be')} (got {describe(given)})"
    return f"{msg} (got {describe(given)})" if not isinstance(given, (dict, list)) else msg


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _field_range(model: type[BaseModel], loc: tuple) -> str:
    """The range a numeric field allows, in words ("from 1 to 1,000,000", "above 0 and at most 100,000"), from
    its constraints; empty when the field at ``loc`` has none."""
    cur: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            break
        info = fields[part]
        cur = model_in(info.annotation)
    if info is None or cur is not None:
        return ""
    metas = list(info.metadata)
    stack = [info.annotation]
    while stack:  # Annotated[float, Field(...)] inside a union or a list (qps, concurrency)
        a = stack.pop()
        metas += [m for x in getattr(a, "__metadata__", ()) for m in getattr(x, "metadata", [x])]
        stack += list(typing.get_args(a))
    lo: tuple[str, Any] | None = None
    hi: tuple[str, Any] | None = None
    for m in metas:
        if isinstance(m, (at.Gt, at.Ge)):
            lo = ("above" if isinstance(m, at.Gt) else "from", getattr(m, "gt", getattr(m, "ge", None)))
        elif isinstance(m, (at.Lt, at.Le)):
            hi = ("below" if isinstance(m, at.Lt) else "at most", getattr(m, "lt", getattr(m, "le", None)))
    if lo is None and hi is None:
        return ""
    if lo and hi and lo[0] == "from" and hi[0] == "at most":
        return f"from {_big(lo[1])} to {_big(hi[1])}"
    words = {"from": "at least"}
    return " and ".join(f"{words.get(w, w)} {_big(v)}" for w, v in (b for b in (lo, hi) if b))


def _big(x: Any) -> str:
    return f"{int(x):,}" if float(x).is_integer() else num(float(x))


def yaml_error(e: yaml.YAMLError, fname: str) -> SpecError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark else 1
    problem = getattr(e, "problem", None) or str(e)
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    hint = ""
    if "\\t" in problem or "'\\t'" in problem:
        hint = "; YAML indents with spaces, not tabs"
    elif "mapping values are not allowed" in problem or "expected <block end>" in problem:
        hint = "; check the indentation (keys of one mapping line up), or quote a value that contains ': '"
    where = ""
    if ctx and cmark and _differs(mark, cmark):
        where = f" ({ctx} that started at line {cmark.line + 1})"
    col = f" (column {mark.column + 1})" if mark else ""
    if "expected a single document" in str(ctx):
        return SpecError([f"{fname}:{line}: (syntax): a study file holds one YAML document; "
                          "remove the '---' and what follows, or split it into two files"])
    return SpecError([f"{fname}:{line}: (syntax): YAML syntax error: {problem}{col}{where}{hint}"])


def _differs(a: Any, b: Any) -> bool:
    return a is None or b is None or (a.line, a.column) != (b.line, b.column)


def validation_lines(e: ValidationError, data: Any, lines: dict[tuple, int], fname: str,
                     model: type[BaseModel]) -> list[tuple[int, str]]:
    """(line, ``FILE:LINE: path: message``) for each error of validating ``data`` (read from ``fname``,
    whose key lines are ``lines``) as ``model``."""
    out: list[tuple[int, str]] = []
    raw = e.errors()
    # a union (`qps: 4` or a list of rates) reports every branch; keep the branch the input has the shape of
    raw = [err for err in raw if not wrong_branch(err["loc"], data)] or raw
    errors = [(err, clean_loc(err["loc"], data)) for err in raw]
    # a misspelled required key shows up twice (unknown + missing): keep the "did you mean" only
    typos = {(loc[:-1], close_match(loc[-1], allowed_keys(model, loc)))
             for err, loc in errors if err["type"] == "extra_forbidden" and loc}
    for err, loc in errors:
        if err["type"] == "missing" and loc and (loc[:-1], loc[-1]) in typos:
            continue
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}{did_you_mean_or_list(loc[-1], allowed_keys(model, loc))}"
        elif err["type"] == "missing":
            line = nearest_line(lines, loc[:-1])
            out.append((line, f"{fname}:{line}: {fmt_path(loc)}: required key is missing"))
            continue
        else:
            msg = message(err, model, loc)
        line = nearest_line(lines, loc)
        out.append((line, f"{fname}:{line}: {fmt_path(loc)}: {msg}"))
    return out


def fail_repeats(field: str, keys: list[str], say: Callable[[str, int], str]) -> None:
    """Fail ``field`` at every item whose key an earlier item has; ``say(key, first_index)`` is the message."""
    seen: dict[str, int] = {}
    errs: list[tuple[tuple, str]] = []
    for i, k in enumerate(keys):
        if k in seen:
            errs.append(((i,), say(k, seen[k])))
        seen.setdefault(k, i)
    if errs:
        fail(field, errs)
