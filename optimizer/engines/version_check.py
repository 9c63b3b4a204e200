"""Does the installed engine accept every flag servetune would pass it?

Both engines churn flags between minor releases, and argparse silently takes a unique *prefix* of a real
flag as that flag, so a removed flag can change meaning instead of failing (reference §0). Run this on the
GPU host before a study, against the engine's own help text:

    vllm serve --help=all > vllm-help.txt            # plain --help shows only the group summaries
    python3 -m sglang.launch_server --help > sglang-help.txt
    python3 -m servetune.optimizer.engines.version_check vllm --version 0.26.0 --help-file vllm-help.txt
    python3 -m servetune.optimizer.engines.version_check sglang --run      # runs the help command itself

Exit status 0 when every flag is accepted, 1 when some are not (each listed with the parameters using it).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from typing import Any

from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.engines.registry import engine_class, get_engine, names

_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def flags_in_help(text: str) -> set[str]:
    """Option strings an argparse help text declares: its usage block and its option lines (the part of
    each option line before the description column). Flags only named in prose are not counted."""
    out: set[str] = set()
    lines = text.splitlines()
    in_usage = False
    for line in lines:
        if line.startswith("usage:"):
            in_usage = True
        elif in_usage and not line.strip():
            in_usage = False
        if in_usage:
            out.update(m for m in _FLAG.findall(line) if m.startswith("--"))
            continue
        m = re.match(r"^ {1,6}(-{1,2}[A-Za-z][^\s,]*.*)$", line)
        if m:
            head = re.split(r"\s{2,}", m.group(1).strip(), maxsplit=1)[0]
            out.update(f for f in _FLAG.findall(head) if f.startswith("--"))
    return out


def _flag_name(token: str) -> str:
    """``--speculative-config.method`` is the dotted form of ``--speculative-config``; ``--x=1`` is ``--x``."""
    return token.split("=", 1)[0].split(".", 1)[0]


def used_flags(engine: Any) -> dict[str, list[str]]:
    """Every flag the adapter can emit → the parameters (or fixed parts of the command) that emit it."""
    cat = engine.catalog
    used: dict[str, list[str]] = {}

    def add(tok: str, who: str) -> None:
        if tok.startswith("--"):
            used.setdefault(_flag_name(tok), [])
            if who not in used[_flag_name(tok)]:
                used[_flag_name(tok)].append(who)

    for name, m in cat.params.items():
        if m.flag is None:
            continue
        if m.style == "bool_argv":
            for tok in (*m.when_true, *m.when_false):
                add(tok, name)
            if not (m.when_true or m.when_false):
                add(m.flag, name)
        else:
            add(m.flag, name)
            if m.style == "bool_optional":
                add("--no-" + m.flag.removeprefix("--"), name)
    for f in (cat.model_flag, cat.served_name_flag, cat.host_flag, cat.port_flag):
        if f:
            add(f, "(command)")
    model = ModelRef(name="m", path="/m", shape={}, load_format="dummy")
    try:
        argv = engine.plan({}, model, host="127.0.0.1", port=8000, gpu_ids=[0]).argv
    except Exception:  # noqa: BLE001 - an adapter that cannot plan nothing still has its catalog checked
        argv = []
    for tok in argv:
        add(tok, "(always passed)")
    return used


def missing_flags(help_text: str, engine_name: str, version: str | None = None) -> list[tuple[str, list[str]]]:
    """Flags the adapter would pass that the help text does not declare: [(flag, [parameters])]."""
    engine = get_engine(engine_name, None, version)
    known = flags_in_help(help_text)
    return [(f, who) for f, who in sorted(used_flags(engine).items()) if f not in known]


def help_text_of(engine_name: str, command: list[str] | None = None) -> str:
    argv = (command or get_engine(engine_name).base_command()) + list(engine_class(engine_name).help_args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    return proc.stdout + "\n" + proc.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m servetune.optimizer.engines.version_check",
                                 description="List catalog flags the installed engine does not accept.")
    ap.add_argument("engine", choices=[n for n in names() if not engine_class(n).simulated])
    ap.add_argument("--version", dest="engine_version", default=None,
                    help="catalog version to check (default: the catalog's own)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--help-file", help="saved output of the engine's help (vllm serve --help=all)")
    src.add_argument("--run", action="store_true", help="run the engine's help command here")
    ap.add_argument("--command", nargs="+", default=None, help="engine launch command (default: the catalog's)")
    a = ap.parse_args(argv)
    if a.help_file:
        with open(a.help_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = help_text_of(a.engine, a.command)
    if not flags_in_help(text):
        print("no flags found in the help text: is it the output of the engine's --help?", file=sys.stderr)
        return 2
    missing = missing_flags(text, a.engine, a.engine_version)
    if not missing:
        print(f"ok: every flag the {a.engine} catalog can pass is accepted")
        return 0
    for flag, who in missing:
        print(f"{flag}: not accepted (used by {', '.join(who)})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
