"""Secrets in a study: ``${NAME}`` references, names that look secret, and masking by value.

A study never holds a secret's value: it writes ``${NAME}`` and the value is read from the environment of the
shell that runs servetune, at launch. Whatever came in through such a reference is masked wherever it could be
written (engine logs, request records, failure reasons), whatever the name of the key or flag that carried it.

The one definition of each rule lives here (the study's validation, the launch, the exports and ``servetune
bench`` all use it). Not named ``secrets``: that would shadow the standard library's module for a script run
from this folder.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

# ${NAME} anywhere in a text, and a text that is exactly one reference
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
WHOLE_REF = re.compile(f"^{ENV_REF.pattern}$")

# Name parts (split at anything but letters and digits) that make a variable or flag a secret, and parts that
# make it a path to one (a key file is not the key).
_SECRET_PARTS = frozenset({"TOKEN", "SECRET", "KEY", "APIKEY", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS"})
_PATH_PARTS = frozenset({"FILE", "PATH", "DIR"})
_PATH_PREFIXES = ("/", "./", "../", "~/")

# Values shorter than this are not masked: they cannot be told from ordinary words and numbers in a log.
MIN_MASKED_LEN = 4


def looks_secret(name: str) -> bool:
    """Whether an environment variable or a flag (``HF_TOKEN``, ``--api-key``) by its name carries a secret."""
    parts = {p for p in re.split(r"[^A-Za-z0-9]+", name.upper()) if p}
    return bool(parts & _SECRET_PARTS) and not parts & _PATH_PARTS


def is_literal_secret(name: str, value: str) -> bool:
    """A secret-looking name holding a value written out (not a reference, not a path to a key file)."""
    if not looks_secret(name) or not value.strip() or ENV_REF.search(value):
        return False
    return not value.startswith(_PATH_PREFIXES)


def ref_name(flag: str) -> str:
    """The environment variable a secret flag's value is read from: ``--api-key`` → ``API_KEY``."""
    return re.sub(r"[^A-Z0-9]+", "_", flag.lstrip("-").upper()).strip("_") or "SECRET"


def expand(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``${NAME}`` references replaced by their values (an unset variable reads as empty)."""
    env = os.environ if environ is None else environ
    return ENV_REF.sub(lambda m: env.get(m.group(1), ""), text)


def referenced(texts: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every variable the texts reference, with its value now: what must be masked in what the launch writes."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for t in texts:
        for name in ENV_REF.findall(str(t)):
            out[name] = env.get(name, "")
    return out


def mask(text: str, values: Mapping[str, str]) -> str:
    """Each value (of at least MIN_MASKED_LEN characters) replaced by its ``${NAME}`` reference."""
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[1] or "")):
        if value and len(value) >= MIN_MASKED_LEN and value in text:
            text = text.replace(value, "${" + name + "}")
    return text


def secret_flag_values(args: list[str]) -> list[tuple[int, str, str, bool]]:
    """Values given to secret-looking flags in an argv fragment, in both forms: ``--api-key X`` and
    ``--api-key=X``. Returns (index of the value's word, flag, value, joined-with-=) for each."""
    out = []
    for k, a in enumerate(args):
        if not a.startswith("--"):
            continue
        flag, eq, value = a.partition("=")
        if not looks_secret(flag):
            continue
        if eq:
            out.append((k, flag, value, True))
        elif k + 1 < len(args) and not args[k + 1].startswith("--"):
            out.append((k + 1, flag, args[k + 1], False))
    return out


def literal_flag_secrets(args: list[str]) -> list[tuple[int, str]]:
    """(index, flag) of each secret flag whose value is written out instead of referenced."""
    return [(k, flag) for k, flag, value, _ in secret_flag_values(args)
            if value.strip() and not ENV_REF.search(value) and not value.startswith(_PATH_PREFIXES)]
