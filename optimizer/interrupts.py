"""Ctrl-C that cannot be lost.

Python turns SIGINT into ``KeyboardInterrupt`` in whatever frame runs when the signal lands. When that frame
is a garbage-collection or weakref callback, the interpreter prints "Exception ignored in ..." and the
interrupt is gone: a study went on to its end after Ctrl-C (seen in tests/test_reliability_engine.py on a
busy machine). :func:`catching` installs a handler that also notes the signal, and the driver's wait loop
calls :func:`check`, which raises a noted interrupt that no frame received.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_noted = False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _noted
    _noted = True
    raise KeyboardInterrupt


@contextmanager
def catching() -> Iterator[None]:
    """SIGINT noted as well as raised, for the duration (main thread only: elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        clear()


def check() -> None:
    """Raise ``KeyboardInterrupt`` for a SIGINT that was noted and not yet handled."""
    if _noted:
        clear()
        raise KeyboardInterrupt


def clear() -> None:
    """The interrupt was handled (its ``KeyboardInterrupt`` reached the code that stops the study)."""
    global _noted
    _noted = False
