"""Waking an asyncio issue loop at an absolute ``time.perf_counter()`` time, to the tens of microseconds.

``asyncio.sleep`` cannot: the selector rounds its timeout *up* to whole milliseconds (``epoll_wait``
takes ms), so every scheduled send is up to 1 ms late and the lag is charged to the server's TTFT — the
timer quantisation that made AIPerf under-deliver at ≥ 500 req/s (ai-dynamo/aiperf#1185). On Linux a
``timerfd`` armed with an absolute CLOCK_MONOTONIC deadline (``perf_counter``'s clock there) wakes the
loop's ``epoll`` exactly when due while the loop keeps serving I/O: no spinning, no thread. Elsewhere, or
if the timerfd cannot be made, :class:`Pacer` falls back to ``asyncio.sleep``.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time

try:  # pragma: no cover - platform probe
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    class _Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class _Itimerspec(ctypes.Structure):
        _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]
except (ImportError, OSError):  # pragma: no cover
    _libc = None

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


def _perf_counter_is_monotonic() -> bool:
    return "CLOCK_MONOTONIC" in time.get_clock_info("perf_counter").implementation


class Pacer:
    """``await pacer.until(t)`` returns at the first moment ``time.perf_counter() >= t``.

    One per event loop; :meth:`close` it when done. ``kind`` says which mechanism is in use ("timerfd" or
    "asyncio.sleep"), so results can state it.
    """

    def __init__(self) -> None:
        self.fd = -1
        self.kind = "asyncio.sleep"
        self._waiter: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if _libc is not None and _perf_counter_is_monotonic() and not os.environ.get("SERVETUNE_NO_TIMERFD"):
            try:
                fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            except AttributeError:
                fd = -1
            if fd >= 0:
                self.fd = fd
                self.kind = "timerfd"

    def _arm(self, t: float) -> None:
        assert _libc is not None  # only armed in timerfd mode, which needs libc
        sec = int(t)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((t - sec) * 1e9)))
        if _libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _on_ready(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:  # spurious wake-up: the timer has not expired
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def until(self, t: float) -> None:
        while (delay := t - time.perf_counter()) > 0:
            if self.fd < 0:
                await asyncio.sleep(delay)
                continue
            loop = asyncio.get_running_loop()
            if self._loop is not loop:
                if self._loop is not None:
                    self._loop.remove_reader(self.fd)
                loop.add_reader(self.fd, self._on_ready)
                self._loop = loop
            self._waiter = loop.create_future()
            self._arm(t)
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if self.fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
