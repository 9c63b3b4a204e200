"""A Ctrl-C that lands inside a weakref or garbage-collection callback is swallowed by the interpreter
("Exception ignored in ..."); the driver must still stop."""
from __future__ import annotations

import os
import signal
import weakref

import pytest

from servetune.optimizer import interrupts


class _Obj:
    pass


def _signal_inside_a_weakref_callback() -> None:
    obj = _Obj()

    def callback(_: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs here, at a bytecode boundary of the callback
            pass

    ref = weakref.ref(obj, callback)
    del obj  # the callback runs now; its KeyboardInterrupt is printed and dropped
    assert ref() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one, printed
def test_an_interrupt_the_interpreter_dropped_is_raised_by_check():
    with interrupts.catching():
        _signal_inside_a_weakref_callback()  # no exception reaches us
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        interrupts.check()  # raised once: the study's own handling cleared it


def test_a_delivered_interrupt_is_not_raised_twice():
    # not default_int_handler: a shell that starts the tests in the background sets SIGINT to SIG_IGN
    before = signal.getsignal(signal.SIGINT)
    with interrupts.catching():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):
                pass
        interrupts.clear()  # what the driver does when its KeyboardInterrupt arrives
        interrupts.check()
    assert signal.getsignal(signal.SIGINT) is before
