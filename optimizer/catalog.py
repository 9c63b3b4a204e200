"""Engine catalogs: ``search_spaces/<engine>.yaml`` read into plain data.

A catalog says, for one engine and version, how each engine-neutral parameter becomes a flag, what the
engine's default is, and which domain to search when the study gives none. This is the one place a reader
looks to follow a parameter from YAML to argv (:func:`render_flags`) and back (:func:`parse_flags`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from packaging.version import Version

from servetune.optimizer.parameters import PARAMETERS


@dataclass(frozen=True)
class ParamMapping:
    name: str
    flag: str | None  # None: the engine has no such knob (the parameter is rejected if searched)
    default: Any = None  # the engine's own default (the baseline); None = leave unset
    domain: Any = None  # default search domain: list, or {low, high, step?, log?}
    # value | bool_optional (--x / --no-x) | bool_flag (--x when true) | bool_flag_inverted | bool_argv
    style: str = "value"
    values: dict[str, Any] = field(default_factory=dict)  # neutral value -> engine spelling
    omit: tuple = ()  # neutral values that mean "do not pass the flag"
    # style bool_argv: the exact argv fragment for true / for false (either may be empty). For knobs that are
    # not one flag per value, e.g. SGLang chunked_prefill=false -> ["--chunked-prefill-size", "-1"], or vLLM
    # 0.33's --enable-x / --disable-x pairs. ``flag`` stays the knob's main flag (what version checks look for).
    when_true: tuple = ()
    when_false: tuple = ()
    # Every value the engine accepts (neutral spelling; ``values`` spellings count too). Empty: not listed, so
    # not checked. A study value outside it is refused before launch instead of failing the engine (bad_args).
    choices: tuple = ()

    def accepts(self, value: Any) -> bool:
        if not self.choices or value is None:
            return True
        v = str(value)
        return v in self.choices or v in self.values or v in {str(x) for x in self.values.values()}


@dataclass(frozen=True)
class Catalog:
    engine: str
    version: str
    command: tuple[str, ...]
    params: dict[str, ParamMapping]
    model_flag: str | None = None
    served_name_flag: str | None = None
    host_flag: str = "--host"
    port_flag: str = "--port"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def defaults(self) -> dict[str, Any]:
        return {n: p.default for n, p in self.params.items() if p.default is not None}

    def default_domains(self) -> dict[str, Any]:
        return {n: p.domain for n, p in self.params.items() if p.domain is not None}


def _read_yaml(name: str) -> dict[str, Any]:
    text = resources.files("servetune.search_spaces").joinpath(name).read_text(encoding="utf-8")
    return yaml.safe_load(text)


@functools.lru_cache(maxsize=None)
def parameters() -> dict[str, dict[str, Any]]:
    """The engine-neutral parameter names with type, help and dependencies."""
    return PARAMETERS


@functools.lru_cache(maxsize=None)
def load_catalog(engine: str, version: str | None = None) -> Catalog:
    """The catalog for ``engine``; a ``versions:`` block in it overrides mappings for other releases."""
    raw = _read_yaml(f"{engine}.yaml")
    params_raw: dict[str, Any] = dict(raw.get("params", {}))
    if version and version != str(raw.get("version")):
        for vkey, override in (raw.get("versions") or {}).items():
            if _version_matches(version, str(vkey)):
                for name, m in (override.get("params") or {}).items():
                    params_raw[name] = None if m is None else {**params_raw.get(name, {}), **m}
    params = {}
    for name, m in params_raw.items():
        if m is None:
            continue
        params[name] = ParamMapping(
            name=name, flag=m.get("flag"), default=m.get("default"), domain=m.get("domain"),
            style=m.get("style", "value"), values=dict(m.get("values") or {}), omit=tuple(m.get("omit") or ()),
            when_true=tuple(str(a) for a in m.get("when_true") or ()),
            when_false=tuple(str(a) for a in m.get("when_false") or ()),
            choices=tuple(str(c) for c in m.get("choices") or ()),
        )
    return Catalog(
        engine=raw["engine"], version=str(version or raw.get("version", "")), command=tuple(raw["command"]),
        params=params, model_flag=raw.get("model_flag"), served_name_flag=raw.get("served_name_flag"),
        host_flag=raw.get("host_flag", "--host"), port_flag=raw.get("port_flag", "--port"), raw=raw,
    )


def _version_matches(version: str, spec: str) -> bool:
    """``spec`` is a version prefix ("0.33") or a lower bound (">=0.27")."""
    if spec.startswith(">="):
        return Version(version) >= Version(spec[2:])
    return version == spec or version.startswith(spec + ".")


def render_flags(catalog: Catalog, params: dict[str, Any]) -> list[str]:
    """argv fragment for ``params`` (engine-neutral names), in catalog order, full flag names only."""
    argv: list[str] = []
    for name, m in catalog.params.items():
        if name not in params or m.flag is None:
            continue
        value = params[name]
        if value is None or value in m.omit:
            continue
        value = m.values.get(str(value), value) if m.values else value
        if m.style == "bool_optional":
            argv.append(m.flag if _truthy(value) else "--no-" + m.flag.removeprefix("--"))
        elif m.style == "bool_flag":
            if _truthy(value):
                argv.append(m.flag)
        elif m.style == "bool_flag_inverted":  # e.g. SGLang --disable-radix-cache for prefix_caching=false
            if not _truthy(value):
                argv.append(m.flag)
        elif m.style == "bool_argv":
            argv += list(m.when_true if _truthy(value) else m.when_false)
        else:
            argv += [m.flag, _fmt(value)]
    return argv


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.lower() in ("1", "true", "yes", "on")
    return bool(v)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    return str(v)


def coerce(v: str) -> Any:
    """A flag's text value as the YAML-ish scalar it spells: true/false, an int, a float, else the text."""
    if v in ("true", "True"):
        return True
    if v in ("false", "False"):
        return False
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def parse_flags(catalog: Catalog, args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The catalog's reverse mapping: argv fragment → (engine-neutral params, args no mapping claimed).

    Engine spellings map back through ``values`` (fp8_e4m3 → fp8), bool styles back to booleans. What an
    adapter spells out beyond the catalog reads back through its ``neutral_params``."""
    seqs = []  # bool_argv fragments, longest first
    by_flag: dict[str, list[ParamMapping]] = {}
    for m in catalog.params.values():
        if m.flag is None:
            continue
        if m.style == "bool_argv":
            if m.when_true:
                seqs.append((list(m.when_true), m.name, True))
            if m.when_false:
                seqs.append((list(m.when_false), m.name, False))
            continue
        by_flag.setdefault(m.flag, []).append(m)
        if m.style == "bool_optional":
            by_flag.setdefault("--no-" + m.flag.removeprefix("--"), []).append(m)
    seqs.sort(key=lambda s: -len(s[0]))
    params: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        hit = next((s for s in seqs if args[i: i + len(s[0])] == s[0]), None)
        if hit:
            params[hit[1]] = hit[2]
            i += len(hit[0])
            continue
        ms = by_flag.get(a)
        if not ms:
            rest.append(a)
            i += 1
            continue
        m = ms[0]
        if m.style == "bool_optional":
            params[m.name] = a == m.flag
            i += 1
        elif m.style == "bool_flag":
            params[m.name] = True
            i += 1
        elif m.style == "bool_flag_inverted":
            params[m.name] = False
            i += 1
        else:
            raw = args[i + 1] if i + 1 < len(args) else ""
            inverse = {str(v): k for k, v in m.values.items()}
            v = inverse.get(raw, raw)
            params[m.name] = coerce(v) if isinstance(v, str) else v
            i += 2
    return params, rest
