"""One topic's consumer, inside a ``Worker``: claims batches, dispatches by workflow name, keeps leases, answers.

A consumer serves every callback of one topic (one ``WorkerConfig`` per workflow name). It claims with
``worker_dequeue(..., workflows=<the names it serves>)``, so a message that no local callback serves stays
queued for a worker that can serve it. It never claims more messages than the worker has free handler slots.

How a handler's outcome is answered (one rule each, the same for every tool):

=====================================  =================================================================
the handler returned a JSON result     ``worker_respond(result)``
the arguments or the result were       ``worker_respond({"error": message}, is_error=True)``: the caller's
refused (``ToolInputError``,           or the tool's mistake, told at once; retrying cannot help
``ToolOutputError``)
the handler raised anything else       ``worker_fail(message, retry_in_ms=<RetryPolicy delay>)``, and once
                                       the attempts are used up ``worker_fail(message, None)``: dead-lettered,
                                       the caller gets the exception's message (never a traceback)
the caller cancelled, or the deadline  the handler is cancelled, then ``worker_fail(..., None)``
passed while it ran
the lease was lost                     the handler is cancelled and nothing is written: another worker owns it
the worker is shutting down            the handler is cancelled after the grace period, then
                                       ``worker_release``: another worker takes the message at once
=====================================  =================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import anyio
import anyio.abc

from .config import WorkerConfig
from .errors import HotMeshError, InvalidInput, PayloadTooLarge
from .postgres import backoff, is_connection_error
from .streams import Claimed, WorkerAPI
from .tools import ToolContext, ToolInputError, ToolOutputError

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 30.0
"""Seconds a worker keeps trying to write an answer through connection errors (a restarting server)."""

DEADLINE_TEXT = "the call's deadline passed while the tool was running"


class Slots:
    """The worker's free handler slots, shared by its consumers; freeing one wakes consumers that ran out."""

    def __init__(self, total: int) -> None:
        self._free = anyio.Semaphore(total)
        self.on_free: list[Callable[[], None]] = []

    def take(self, most: int) -> int:
        taken = 0
        while taken < most:
            try:
                self._free.acquire_nowait()
            except anyio.WouldBlock:
                break
            taken += 1
        return taken

    def give(self, count: int) -> None:
        for _ in range(count):
            self._free.release()
        if count:
            for wake in self.on_free:
                wake()


@dataclass(eq=False)
class _Running:
    """A claimed message whose handler is running."""

    msg: Claimed
    config: WorkerConfig
    ctx: ToolContext
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    check: anyio.Event = field(default_factory=anyio.Event)  # set: look at the lease now
    reason: str | None = None  # why the handler was stopped: "cancelled", "lost" or "shutdown"

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.ctx.cancelled.set()
            self.scope.cancel()


Outcome = tuple[str, Any]  # ("ok", result) | ("refused", message) | ("raised", exception)


class Consumer:
    """Claims and runs the messages of one topic for the callbacks in ``configs`` (all on that topic)."""

    def __init__(
        self,
        api: WorkerAPI,
        configs: list[WorkerConfig],
        *,
        consumer_id: str,
        slots: Slots,
        poll_interval: float,
        heartbeat_interval: float,
    ) -> None:
        self.api = api
        self.topic = configs[0].topic
        self.callbacks = {c.workflow_name: c for c in configs}
        self.workflows = sorted(self.callbacks)
        self.lease_ms = configs[0].reclaim_delay
        self.reclaim_count = configs[0].reclaim_count
        self.consumer_id = consumer_id
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self._slots = slots
        self._running: dict[UUID, _Running] = {}  # by lease: a message reclaimed from us may run here twice
        self._wake = anyio.Event()
        self._finished = anyio.Event()
        self._stopping = False
        self._starved = False
        self._beat = anyio.Lock()  # a heartbeat never lands after the goodbye
        self._gone = False
        self._handlers: anyio.abc.TaskGroup | None = None
        slots.on_free.append(self._slot_freed)

    # ------------------------------------------------------------------------------------- wake-ups

    def wake(self) -> None:
        self._wake.set()

    def notify(self, payload: str) -> None:
        """A NOTIFY on the topic's channel: new work, or ``c:<id>`` (a caller cancelled message ``id``)."""
        if payload.startswith("c:"):
            for running in list(self._running.values()):
                if payload == f"c:{running.msg.id}":
                    running.check.set()
            return
        self.wake()

    def _slot_freed(self) -> None:
        if self._starved:
            self.wake()

    async def _wake_after(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        self.wake()

    # ------------------------------------------------------------------------------------ lifecycle

    async def heartbeat(self) -> None:
        """Tell gateways this consumer is live, for three heartbeat intervals."""
        await self.api.heartbeat([self.topic], self.consumer_id, int(self.heartbeat_interval * 3000))

    async def run(self) -> None:
        """Claim and run until ``stop_claiming``; then keep heartbeating until cancelled."""
        async with anyio.create_task_group() as tg:
            self._handlers = tg
            tg.start_soon(self._heartbeat_loop)
            await self._claim_loop()

    def stop_claiming(self) -> None:
        self._stopping = True
        self.wake()

    def abandon(self) -> None:
        """Cancel every running handler; each releases its message for another worker."""
        for running in list(self._running.values()):
            running.stop("shutdown")

    async def wait_idle(self) -> None:
        while self._running:
            await self._finished.wait()

    async def goodbye(self) -> None:
        """No more heartbeats; gateways stop counting this consumer at once (``worker_goodbye``)."""
        async with self._beat:
            self._gone = True
            await self.api.goodbye(self.consumer_id)

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            async with self._beat:
                if self._gone:
                    return
                try:
                    await self.heartbeat()
                except HotMeshError as exc:
                    log.warning("heartbeat for %r failed: %s", self.topic, exc)

    # ---------------------------------------------------------------------------------------- claim

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake = anyio.Event()  # reset before claiming: a NOTIFY from now on wakes the next round
            delay = self.poll_interval
            try:
                await self._claim_all()
                if failures:
                    log.info("claiming from %r works again", self.topic)
                failures = 0
            except Exception as exc:  # the loop must outlive the server: back off, then try again
                failures += 1
                delay = min(backoff(failures - 1, base=0.2, cap=5.0), max(self.poll_interval, 0.2))
                level = logging.WARNING if failures == 1 or not is_connection_error(exc) else logging.DEBUG
                log.log(level, "claiming from %r failed (%s); retrying in %.1fs", self.topic, _text(exc), delay)
            with anyio.move_on_after(delay):
                await self._wake.wait()

    async def _claim_all(self) -> None:
        """Claim batches while messages come back and slots are free."""
        assert self._handlers is not None
        while not self._stopping:
            want = self._slots.take(1000)
            self._starved = want == 0
            if not want:
                return
            claimed: list[Claimed] = []
            try:
                claimed = await self.api.dequeue(
                    self.topic, self.consumer_id, want, self.lease_ms, self.workflows, self.reclaim_count
                )
            finally:
                self._slots.give(want - len(claimed))
            for msg in claimed:
                self._handlers.start_soon(self._handle, msg)
            if len(claimed) < want:
                return

    # ---------------------------------------------------------------------------------------- run

    async def _handle(self, msg: Claimed) -> None:
        config = self.callbacks.get(msg.workflow_name)
        if config is None:  # worker_dequeue returns only the workflows asked for; never run a stranger
            self._slots.give(1)
            await _quietly(self.api.release(self.topic, msg.id, msg.lease))
            return

        async def progress(value: float, total: float | None, message: str | None) -> None:
            try:
                await self.api.progress(self.topic, msg.id, msg.lease, value, total, message)
            except HotMeshError as exc:  # progress is a courtesy: never fail the handler for it
                log.debug("progress for message %d not recorded: %s", msg.id, exc)

        ctx = ToolContext(
            attempt=msg.attempt, deadline=msg.deadline, progress=progress,
            workflow_name=msg.workflow_name, topic=self.topic,
        )
        running = self._running[msg.lease] = _Running(msg, config, ctx)
        try:
            outcome = await self._execute(running)
            with anyio.move_on_after(ANSWER_TIMEOUT, shield=True):
                try:
                    await self._answer(running, outcome)
                except HotMeshError as exc:
                    log.error("could not answer message %d on %r: %s", msg.id, self.topic, exc)
        finally:
            del self._running[msg.lease]
            self._finished.set()  # wakes whoever waits for a handler to end; the next wait needs a new event
            self._finished = anyio.Event()
            self._slots.give(1)

    async def _execute(self, running: _Running) -> Outcome:
        assert running.config.callback is not None
        outcome: Outcome = ("raised", RuntimeError("the handler did not finish"))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, running)
                with running.scope:
                    try:
                        outcome = ("ok", await running.config.callback(running.msg.args, running.ctx))
                    except (ToolInputError, ToolOutputError) as exc:
                        outcome = ("refused", str(exc))
                    except Exception as exc:
                        log.warning("tool on %r raised", self.topic, exc_info=True)
                        outcome = ("raised", exc)
                tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            # The worker itself was cancelled, not stopped gracefully: give the message back anyway.
            with anyio.move_on_after(5, shield=True):
                await _quietly(self.api.release(self.topic, running.msg.id, running.msg.lease))
            raise
        return outcome

    async def _keep_lease(self, running: _Running) -> None:
        """Extend the lease at half its length; stop the handler when the caller cancels or the deadline passes.

        ``worker_extend`` is asked at once when a ``c:<id>`` NOTIFY says this message was cancelled, and when
        the local clock says the deadline passed (the server's clock decides).
        """
        msg = running.msg
        half = self.lease_ms / 2000
        retry_soon = False
        while True:
            wait = min(half, 1.0) if retry_soon else half
            if msg.deadline is not None:
                left = (msg.deadline - datetime.now(UTC)).total_seconds()
                wait = min(wait, max(left + 0.05, 0.25))
            with anyio.move_on_after(wait):
                await running.check.wait()
            running.check = anyio.Event()
            try:
                state = await self.api.extend(self.topic, msg.id, msg.lease, self.lease_ms)
            except HotMeshError as exc:
                log.warning("could not extend the lease of message %d: %s", msg.id, exc)
                retry_soon = True
                continue
            retry_soon = False
            if state is None:
                log.warning("lost the lease of message %d on %r; another worker may run it", msg.id, self.topic)
                running.stop("lost")
                return
            if state:
                running.stop("cancelled")
                return

    # ------------------------------------------------------------------------------------- answer

    async def _answer(self, running: _Running, outcome: Outcome) -> None:
        msg, stream = running.msg, self.topic
        api = self.api
        if running.reason == "lost":
            return
        if running.reason == "shutdown":
            await _persist(lambda: api.release(stream, msg.id, msg.lease))
            return
        if running.reason == "cancelled":  # the database writes "cancelled by the caller" when it was
            await _persist(lambda: api.fail(stream, msg.id, msg.lease, DEADLINE_TEXT, None))
            return
        kind, value = outcome
        if kind == "ok":
            try:
                ok = await _persist(lambda: api.respond(stream, msg.id, msg.lease, value))
            except (InvalidInput, PayloadTooLarge) as exc:
                error = {"error": f"the tool's result was refused: {exc}"}
                ok = await _persist(lambda: api.respond(stream, msg.id, msg.lease, error, True))
        elif kind == "refused":
            ok = await _persist(lambda: api.respond(stream, msg.id, msg.lease, {"error": value}, True))
        else:
            delay = running.config.retry.next_delay(msg.attempt)
            ok = await _persist(lambda: api.fail(stream, msg.id, msg.lease, _text(value), delay))
            if ok and delay is not None and self._handlers is not None:
                self._handlers.start_soon(self._wake_after, delay / 1000)
        if not ok:
            log.warning("message %d on %r was answered by nobody: its lease was lost", msg.id, stream)


def _text(exc: BaseException) -> str:
    """An exception as the caller sees it: its message, or its class name when it has none."""
    return str(exc).strip() or type(exc).__name__


async def _persist(call: Callable[[], Awaitable[bool]]) -> bool:
    """Run one answering call, retrying through connection errors (the lease outlives a short outage)."""
    failures = 0
    while True:
        try:
            return await call()
        except HotMeshError as exc:
            if not is_connection_error(exc):
                raise
            failures += 1
            log.warning("could not reach PostgreSQL to answer (%s); retrying", exc)
            await anyio.sleep(backoff(failures - 1, base=0.1, cap=2.0))


async def _quietly(call: Awaitable[Any]) -> None:
    try:
        await call
    except HotMeshError as exc:
        log.debug("ignored: %s", exc)
