"""Keep-alive progress: a client that asked for progress hears from a long call at a steady interval.

Clients give up on a call they hear nothing about (the TypeScript SDK after 60 s unless progress resets its
timer; hosts have idle watchdogs). When a ``tools/call`` carries a progress token, the gateway sends a progress
notification whenever the call has been quiet for ``interval`` seconds: "queued, 3 ahead of it" while it waits
in its queue, "running for 45 s" while its handler says nothing. Without a token nothing is sent.

Progress values must increase with every notification, and the handler's own progress (absolute values of its
choosing) goes through the same ``Progress``: a keep-alive nudges the last value sent up by a millionth (of
the value, or of 1 when it is smaller), and a handler's value that would not be above what was sent is nudged
the same way, so the sequence the client sees always increases and the handler's values stay where they were.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio

from ._common import ProgressReport, clip
from ._streams import CallStatus
from .errors import HotMeshError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 15.0
"""Seconds a call may be quiet before its client hears a keep-alive (clients time out at 60 s and up)."""
STEP = 1e-6
AHEAD_CAP = 1000  # caller_call_status counts the calls ahead of one up to this


def above(value: float) -> float:
    """The next progress value after ``value``: up by a millionth of it (of 1 when it is smaller)."""
    return value + max(abs(value), 1.0) * STEP


class Progress:
    """The progress notifications of one call, always increasing: the handler's, merged with keep-alives."""

    def __init__(self, send: ProgressReport) -> None:
        self._send = send
        self._lock = anyio.Lock()
        self.sent: float | None = None  # the last value sent
        self.total: float | None = None  # the handler's last total
        self.message: str | None = None  # the handler's last message
        self.quiet_since = anyio.current_time()

    async def handler(self, progress: float, total: float | None, message: str | None) -> None:
        """The handler's own progress, as it gave it unless that would not increase."""
        async with self._lock:
            self.total, self.message = total, message
            value = progress if self.sent is None or progress > self.sent else above(self.sent)
            await self._emit(value, total, message)

    async def tick(self, message: str) -> None:
        """A keep-alive: the last value nudged up, the handler's total while the value stays within it."""
        async with self._lock:
            value = 0.0 if self.sent is None else above(self.sent)
            total = self.total if self.total is not None and value <= self.total else None
            await self._emit(value, total, message)

    async def _emit(self, value: float, total: float | None, message: str | None) -> None:
        self.sent = value
        self.quiet_since = anyio.current_time()
        try:
            await self._send(value, total, message)
        except Exception as exc:  # progress is a courtesy; the call goes on
            log.debug("progress not delivered: %s", exc)


def describe(status: CallStatus | None, handler_message: str | None) -> str:
    """What a keep-alive says about a call: where it is in its queue, or how long it has run."""
    if status is None:
        return "waiting for the tool"
    if status.state == "ready":
        if status.ahead is None:
            return "queued"
        if status.ahead == 0:
            return "queued, next in line"
        more = " or more" if status.ahead >= AHEAD_CAP else ""
        return f"queued, {status.ahead}{more} ahead of it"
    if status.state == "reserved":
        since = status.started_at or status.created_at
        seconds = max(0, round((datetime.now(UTC) - since).total_seconds()))
        running = f"running for {seconds} s"
        return f"{clip(handler_message, 200)} ({running})" if handler_message else running
    return "finishing"


async def keep_alive(progress: Progress, status: Callable[[], Awaitable[CallStatus | None]],
                     interval: float) -> None:
    """Until cancelled: whenever ``progress`` has been quiet for ``interval`` seconds, look at the call
    (``status``) and send a keep-alive saying where it is."""
    while True:
        due = progress.quiet_since + interval
        if anyio.current_time() < due:
            await anyio.sleep(due - anyio.current_time())
            continue
        try:
            found = await status()
        except HotMeshError as exc:  # say something anyway: the point is that the client hears from us
            log.debug("keep-alive: could not read the call: %s", exc)
            found = None
        await progress.tick(describe(found, progress.message))
