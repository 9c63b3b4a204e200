"""A trial's files on the way home: packed on the node that ran it, written into the driver's run directory.

With ``cluster.files: object_store`` a trial on another node runs in a scratch directory there, and its
record, engine log and per-request files travel back through Ray's object store with its result; nothing a
report or export reads stays on the worker. The engine log is the one file that can grow without bound
(a long vLLM start with warnings), so only its tail travels, marked as cut.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from servetune.optimizer.run_dir import TRIALS

ENGINE_LOG_TAIL_BYTES = int(os.environ.get("SERVETUNE_ENGINE_LOG_TAIL_BYTES", str(8 * 1024 * 1024)))
_SKIP = ("engine.pid",)  # a pid means something only on the node that wrote it


def pack(trial_dir: str | os.PathLike, log_tail_bytes: int = ENGINE_LOG_TAIL_BYTES) -> dict[str, bytes]:
    """Every finished file under ``trial_dir`` (relative POSIX path → bytes); temporaries (``.name``) and the
    pid file stay behind, and ``engine.log`` is cut to its last ``log_tail_bytes``."""
    root = Path(trial_dir)
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) or rel.name in _SKIP:
            continue
        if rel.name == "engine.log":
            out[rel.as_posix()] = _tail(path, log_tail_bytes)
        else:
            out[rel.as_posix()] = path.read_bytes()
    return out


def _tail(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= limit:
            return f.read()
        f.seek(size - limit)
        data = f.read()
    cut = data.find(b"\n") + 1  # start at a whole line
    return (f"servetune: the first {size - limit + cut} bytes of this log stayed on the node that ran the "
            "trial; this is its tail\n").encode() + data[cut:]


def unpack(files: dict[str, bytes], trial_dir: str | os.PathLike) -> list[Path]:
    """Write the files under ``trial_dir`` (each write-then-rename, so a reader never sees half a file).
    A path that would leave the directory is refused."""
    root = Path(trial_dir).resolve()
    written = []
    for rel, data in files.items():
        dest = (root / rel).resolve()
        if root not in dest.parents:
            raise ValueError(f"a trial file may not leave its directory: {rel!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(dest)
    return written


def scratch_dir(root: str | os.PathLike, study: str, trial_dir: str | os.PathLike) -> Path:
    """Where a trial runs on a node that is not the driver's: under ``root`` (the node's Ray temp dir),
    named by study and trial directory so repeats (``NNNN/repeat_K``) do not collide."""
    parts = Path(trial_dir).parts
    tail = parts[parts.index(TRIALS) + 1:] if TRIALS in parts else parts[-1:]
    return Path(root, "servetune-trials", study, *tail)


def remove(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
