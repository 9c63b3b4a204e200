"""Reading a file named by untrusted input: a regular file of bounded size, never a FIFO or a device.

``open()`` on a FIFO waits for a writer (``servetune validate`` hung on one), and ``/dev/zero`` or
``/dev/urandom`` never end (reading one exhausts memory). The file is opened without blocking and its type is
checked on the open descriptor, so a name swapped between the check and the read changes nothing.
"""
from __future__ import annotations

import json
import os
import stat


class NotReadable(ValueError):
    """The path names something that is not a readable regular file of bounded size; the text says what."""


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, words in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return words
    return "not a regular file"


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` (which exists) is not a regular file one may read without blocking; None when it is one,
    when it is a directory, or when it does not exist (the caller's own checks say so)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    return f"is {file_kind(st.st_mode)}, not a regular file"


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The file's bytes. FileNotFoundError / IsADirectoryError / PermissionError pass through; anything else
    that is no regular file of at most ``max_bytes`` raises :class:`NotReadable`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotReadable(f"is {file_kind(st.st_mode)}, not a regular file; give the {what}")
        if st.st_size > max_bytes:
            raise NotReadable(f"is {st.st_size:,} bytes; a {what} is at most {max_bytes:,} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while we read it
        raise NotReadable(f"is over {max_bytes:,} bytes; a {what} is at most {max_bytes:,} bytes")
    return data


def read_json(path: str | os.PathLike, max_bytes: int, what: str = "JSON file"):
    """A JSON document from a bounded regular file; ValueError (NotReadable, or a parse error that says where)
    for anything that is not one, including nesting too deep for the parser."""
    data = read_bytes(path, max_bytes, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise NotReadable(f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise NotReadable(f"is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise NotReadable("nests too deeply to be a " + what) from None


