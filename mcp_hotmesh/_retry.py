"""The one way to try again: exponential backoff, and how loudly to say so.

Every loop that must outlive the database (claiming, answering, LISTEN, reading results, housekeeping) uses
``Backoff`` for its delay and its log lines: the first failure of a run is a warning, further failures of the same
kind (an outage, a refused login) are debug lines, and the recovery is one info line. An outage of an hour is two lines,
not one per try. ``retry_transient`` runs one call through passing errors.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from ._postgres import is_transient
from .errors import HotMeshError

T = TypeVar("T")

LOGIN_GRACE = 10.0
"""Seconds a worker goes on after PostgreSQL starts refusing its login, before it stops with that error (a
password rotation may be followed by a restart with the new one)."""

_random = random.Random()
"""The package's own generator: drawing from the ``random`` module's shared one changes state that a caller's
code (a property-based test generating data in a thread, say) relies on."""


def jitter(seconds: float, low: float, high: float) -> float:
    """``seconds`` times a random factor from ``low`` to ``high``: loops of many processes started together do not
    stay in step."""
    return seconds * _random.uniform(low, high)


class Backoff:
    """The consecutive failures of one loop: the delay before its next try, capped, and the level to log it at."""

    def __init__(self, *, base: float = 0.1, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._last: type[BaseException] | None = None

    def failed(self, exc: BaseException) -> tuple[float, int]:
        """Count a failure: the seconds to wait before the next try, and the log level for this one (a warning
        when the failure is new or its kind changed, debug while the same kind goes on)."""
        self.failures += 1
        delay = min(self.cap, self.base * math.pow(2, min(self.failures - 1, 60)))  # 2 ** 1024 overflows a float
        changed = type(exc) is not self._last
        self._last = type(exc)
        return delay, logging.WARNING if changed else logging.DEBUG

    def succeeded(self) -> bool:
        """Count a success; whether it ends a run of failures (worth one line saying it works again)."""
        recovered = self.failures > 0
        self.failures, self._last = 0, None
        return recovered


async def retry_transient(
    call: Callable[[], Awaitable[T]], *, log: logging.Logger, what: str, give_up_after: float | None = None,
    cap: float = 2.0,
) -> T:
    """``await call()``, tried again after a lost connection or a lock wait that timed out, for ``give_up_after``
    seconds at most (None: for as long as it takes); any other error, or the last one, is raised."""
    backoff = Backoff(cap=cap)
    give_up = None if give_up_after is None else anyio.current_time() + give_up_after
    while True:
        try:
            result = await call()
        except HotMeshError as exc:
            if not is_transient(exc) or (give_up is not None and anyio.current_time() >= give_up):
                raise
            delay, level = backoff.failed(exc)
            log.log(level, "%s failed (%s); trying again in %.1fs", what, exc, delay)
            await anyio.sleep(delay)
            continue
        if backoff.succeeded():
            log.info("%s works again", what)
        return result
