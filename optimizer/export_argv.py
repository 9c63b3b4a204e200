"""A trial's recorded launch argv taken apart and rewritten for a deployment: the command, the model, the flags;
secret-looking values made ``${NAME}`` references; the flags servetune added only to measure removed."""
from __future__ import annotations

from dataclasses import dataclass

from servetune.optimizer import secret_refs
from servetune.optimizer.engines import engine_class
from servetune.optimizer.export_choice import ExportError


@dataclass
class SplitArgv:
    base: list[str]  # the command that was run (vllm serve / python3 -m sglang.launch_server / a venv path)
    model: str  # the model path as recorded
    args: list[str]  # everything after, model removed; host/port still in


def split_argv(argv: list[str], catalog) -> SplitArgv:
    i = next((k for k, a in enumerate(argv) if a.startswith("--")), len(argv))
    if catalog.model_flag is None:  # positional model right before the first flag (vllm serve MODEL --x ...)
        if i == 0:
            raise ExportError("recorded argv has no model argument")
        return SplitArgv(base=list(argv[: i - 1]), model=argv[i - 1], args=list(argv[i:]))
    args = list(argv[i:])
    model = ""
    if catalog.model_flag in args:
        k = args.index(catalog.model_flag)
        model = args[k + 1]
        del args[k: k + 2]
    return SplitArgv(base=list(argv[:i]), model=model, args=args)


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out = [flag, value] + out
    return out


def drop_flag(args: list[str], flag: str, with_value: bool = True) -> list[str]:
    out = list(args)
    while flag in out:
        k = out.index(flag)
        del out[k: k + (2 if with_value else 1)]
    return out


def flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def redact_args(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Values of secret-looking flags, in both spellings (``--api-key X`` and ``--api-key=X``), become
    ``${NAME}`` references; the ``=`` spelling is split in two words so that every format sees a whole
    reference it can wire to a secret. Returns (args, secret names, warnings)."""
    hits = {k: (flag, value, joined) for k, flag, value, joined in secret_refs.secret_flag_values(args)}
    out: list[str] = []
    names: list[str] = []
    warns: list[str] = []
    for k, a in enumerate(args):
        if k not in hits:
            out.append(a)
            continue
        flag, value, joined = hits[k]
        m = secret_refs.WHOLE_REF.match(value)
        name = m.group(1) if m else secret_refs.ref_name(flag)
        if not m:
            warns.append(f"{flag} carried a literal value in the recorded argv; exported as ${{{name}}}")
        if joined:
            out.append(flag)  # (the two-word spelling's flag is already in out)
        out.append("${" + name + "}")
        names.append(name)
    return out, names, warns



def without_measurement_flags(args: list[str], engine: str) -> list[str]:
    """The trial's argv less the flags servetune added only to measure it (Engine.measurement_flags)."""
    try:
        flags = set(engine_class(engine).measurement_flags)
    except ValueError:  # an engine this version does not know: its argv as recorded
        return args
    return [a for a in args if a not in flags]


