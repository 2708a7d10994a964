"""One topic's consumer, inside a ``Worker``: claims batches, dispatches by workflow name, keeps leases, answers.

A consumer serves every callback of one topic (one ``WorkerConfig`` per workflow name). It claims with
``worker_dequeue(..., workflows=<the names it serves>)``, so a message that no local callback serves stays
queued for a worker that can serve it. It never claims more messages than the worker has free handler slots.

Answers go out in batches (``batch.Batcher``): the results that are ready while one statement is in flight share
the next, ``worker_respond_and_dequeue``, which also claims the next messages for the slots the answered
handlers leave free (the slots free before stay with the claim loop), so a busy worker pays one round trip and
one commit per batch, not two per message. One task keeps the leases of all running handlers.

How a handler's outcome is answered (one rule each, the same for every tool):

=====================================  =================================================================
the handler returned a JSON result     ``worker_respond(result)``
the handler raised ``ToolError``, or    ``worker_respond({"error": message}, is_error=True)``: the caller's
the arguments or the result were       or the tool's mistake, told at once; retrying cannot help
refused (its subclasses)
the handler raised anything else       ``worker_fail(message, retry_in_ms=<RetryPolicy delay>)``, and once
                                       the attempts are used up (or at once, for an exception the tool's
                                       ``retry_on`` leaves out) ``worker_fail(message, None)``: dead-lettered,
                                       the caller gets the exception's message (never a traceback). One
                                       WARNING line per failed attempt; the traceback at DEBUG
the caller cancelled, or the deadline  the handler is cancelled, then ``worker_fail(..., None)``
passed while it ran
the lease was lost                     the handler is cancelled and nothing is written: another worker owns it
the worker is shutting down            the handler is cancelled after the grace period, then
                                       ``worker_release``: another worker takes the message at once
=====================================  =================================================================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import anyio
import anyio.abc

from ._batching import Batcher
from ._config import WorkerConfig
from ._questions import Questions
from ._retry import LOGIN_GRACE, Backoff, retry_transient
from ._streams import Answer, Claimed, WorkerAPI
from ._tools import ToolContext
from .errors import HotMeshError, InvalidInput, LoginRefused, PayloadTooLarge, ToolError

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 30.0
"""Seconds a worker keeps trying to write an answer through connection errors (a restarting server)."""

DEADLINE_TEXT = "the call's deadline passed while the tool was running"
HANDLER_TASK = "mcp-hotmesh handler"  # named: anyio otherwise works a name out of the callable for every task


class Slots:
    """The worker's free handler slots, shared by its consumers. A consumer that wanted slots and found none
    waits in line (``take(..., wake=...)``); each freed slot wakes the next in line, not every consumer: the
    cost of a freed slot is one wake-up, whatever the number of topics (waking all of them cost ~370,000
    claim-loop passes for 401 freed slots with 1,000 topics)."""

    def __init__(self, total: int) -> None:
        self._free = total  # never awaited: a count is enough (one event loop, no await between test and take)
        self._waiting: dict[Callable[[], None], None] = {}  # in line, first come first woken; each once

    def take(self, most: int, *, wake: Callable[[], None] | None = None) -> int:
        """Up to ``most`` slots; with none free, ``wake`` (when given) is called once one is given back."""
        taken = min(most, self._free)
        self._free -= taken
        if not taken and most and wake is not None:
            self._waiting[wake] = None
        return taken

    def give(self, count: int) -> None:
        self._free += count
        for _ in range(min(count, len(self._waiting))):
            wake = next(iter(self._waiting))
            del self._waiting[wake]
            wake()


@dataclass(eq=False)
class _Running:
    """A claimed message whose handler is running."""

    msg: Claimed
    config: WorkerConfig
    ctx: ToolContext
    due: float  # when its lease is next extended (anyio.current_time())
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    check_now: bool = False  # look at the lease at once (a c:<id> NOTIFY came)
    reason: str | None = None  # why the handler was stopped: "cancelled", "lost" or "shutdown"
    slot_passed: bool = False  # its slot went to the claim of the statement that answered it
    questions: Questions | None = None  # its line to the caller (ctx.elicit, ctx.sample)

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
        self._finished: anyio.Event | None = None  # made by whoever waits for a handler to end
        self._keeper_wake = anyio.Event()
        self._keeper_until = math.inf  # when the lease keeper wakes next, unless woken
        self._stopping = False
        # Whether messages may be waiting: a NOTIFY of new work, or a claim that came back full. An answer
        # claims in the same statement only then; otherwise it would add a claim's work to every answer's
        # commit (and to the latency of a lone call) for nothing. ``_news`` counts NOTIFYs, so a claim that
        # came back short clears ``_backlog`` only if no NOTIFY came meanwhile.
        self._backlog = True
        self._news = 0
        self._handlers: anyio.abc.TaskGroup | None = None
        self._answers: Batcher[tuple[_Running, Answer], bool] = Batcher(self._send_answers)

    @property
    def busy(self) -> bool:
        """Whether a handler runs: the process must hear its cancellations and answers (it may not park)."""
        return bool(self._running)

    # ------------------------------------------------------------------------------------- wake-ups

    def wake(self) -> None:
        self._news += 1
        self._backlog = True
        self._wake.set()

    def _claimed(self, claimed: list[Claimed], *, asked: int, news: int) -> None:
        """A claim asked for ``asked`` messages and got ``claimed``; ``news`` was the NOTIFY count when it was sent.
        Whether work is left behind (a full claim, or news since), and a handler for each message claimed."""
        assert self._handlers is not None
        if asked:
            if len(claimed) >= asked:
                self._backlog = True
            elif news == self._news:
                self._backlog = False
        for msg in claimed:
            self._handlers.start_soon(self._handle, msg, name=HANDLER_TASK)

    def notify(self, payload: str) -> None:
        """A NOTIFY on the topic's channel: new work (empty), or ``c:<id>`` (a caller cancelled message ``id``).
        A new call wakes one consumer on its process's channel instead (``Worker._listen``)."""
        if payload.startswith("c:"):
            for running in list(self._running.values()):
                if payload == f"c:{running.msg.id}":
                    running.check_now = True
                    self._keeper_wake.set()
            return
        if payload.startswith("e:"):  # the caller answered a question (ctx.elicit, ctx.sample)
            for running in list(self._running.values()):
                if payload == f"e:{running.msg.id}" and running.questions is not None:
                    running.questions.wake()
            return
        self.wake()

    def _slot_freed(self) -> None:
        self._wake.set()

    async def _wake_after(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        self.wake()

    # ------------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Claim and run until ``stop_claiming``, then until cancelled: running handlers finish. It claims when
        woken (a NOTIFY, the process's fallback poll, a retry come due, a free slot), never on a timer of its own:
        the worker's ``Pulse`` heartbeats and polls for all its consumers."""
        async with anyio.create_task_group() as tg:
            self._handlers = tg
            await tg.start(self._answers.run)
            tg.start_soon(self._keep_leases)
            await self._claim_loop()
            await anyio.sleep_forever()

    def stop_claiming(self) -> None:
        self._stopping = True
        self.wake()

    def abandon(self) -> None:
        """Cancel every running handler; each releases its message for another worker."""
        for running in list(self._running.values()):
            running.stop("shutdown")

    async def wait_idle(self) -> None:
        while self._running:
            if self._finished is None:
                self._finished = anyio.Event()
            await self._finished.wait()

    # ---------------------------------------------------------------------------------------- claim

    async def _claim_loop(self) -> None:
        backoff = Backoff(base=0.2, cap=min(5.0, max(self.poll_interval, 0.2)))
        refused_since: float | None = None
        while not self._stopping:
            await self._wake.wait()  # a NOTIFY, the process's poll, a retry come due or a free slot
            self._wake = anyio.Event()  # reset before claiming: a NOTIFY from now on wakes the next round
            delay = 0.0
            try:
                await self._claim_all()
                refused_since = None
                if backoff.succeeded():
                    log.info("claiming from %r works again", self.topic)
            except LoginRefused:
                # Revoked, or its password rotated: nothing this worker does will change that. After a short
                # grace (a rotation may be followed by a restart with the new password) the worker stops.
                refused_since = refused_since if refused_since is not None else anyio.current_time()
                if anyio.current_time() - refused_since >= LOGIN_GRACE:
                    raise
                delay = 1.0
            except Exception as exc:  # the loop must outlive the server: back off, then try again
                delay, level = backoff.failed(exc)
                log.log(level, "claiming from %r failed (%s); retrying in %.1fs", self.topic, _exception_text(exc),
                        delay)
            if delay:  # after an error: wait, then try again (a NOTIFY meanwhile cuts it short)
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake.set()

    async def _claim_all(self) -> None:
        """Claim batches while messages come back and slots are free."""
        assert self._handlers is not None
        while not self._stopping:
            want = self._slots.take(1000, wake=self._slot_freed)
            if not want:
                return
            claimed: list[Claimed] = []
            news = self._news
            try:
                claimed = await self.api.dequeue(
                    self.topic, self.consumer_id, want, self.lease_ms, self.workflows, self.reclaim_count
                )
            finally:
                self._slots.give(want - len(claimed))
            self._claimed(claimed, asked=want, news=news)
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

        questions = Questions(self.api, self.topic, msg.id, msg.lease)
        ctx = ToolContext(
            attempt=msg.attempt, deadline=msg.deadline, progress=progress,
            workflow_name=msg.workflow_name, topic=self.topic, call_id=str(msg.id), questions=questions,
        )
        running = self._running[msg.lease] = _Running(msg, config, ctx, self._next_check(msg), questions=questions)
        if running.due < self._keeper_until:
            self._keeper_wake.set()
        try:
            outcome = await self._execute(running)
            # Shielded: the answer is written even if the worker is cancelled meanwhile. Every way of answering
            # gives up after ANSWER_TIMEOUT (the batched one in _respond_and_claim, the others below).
            with anyio.CancelScope(shield=True):
                try:
                    await self._answer(running, outcome)
                except HotMeshError as exc:
                    log.error("could not answer message %d on %r: %s", msg.id, self.topic, exc)
        finally:
            del self._running[msg.lease]
            if self._finished is not None:  # wakes whoever waits for a handler to end
                self._finished.set()
                self._finished = None
            if not running.slot_passed:
                self._slots.give(1)

    async def _execute(self, running: _Running) -> Outcome:
        assert running.config.callback is not None
        outcome: Outcome = ("raised", RuntimeError("the handler did not finish"))
        try:
            with running.scope:  # the lease keeper cancels it (running.stop)
                try:
                    outcome = ("ok", await running.config.callback(running.msg.args, running.ctx))
                except ToolError as exc:  # the call cannot succeed as made: the agent is told, nobody alerted
                    log.info("%s refused message %d: %s", self._what(running.msg), running.msg.id, exc)
                    outcome = ("refused", str(exc))
                except Exception as exc:
                    log.debug("%s raised on message %d", self._what(running.msg), running.msg.id, exc_info=True)
                    outcome = ("raised", exc)
        except anyio.get_cancelled_exc_class():
            # The worker itself was cancelled, not stopped gracefully: give the message back anyway.
            with anyio.move_on_after(5, shield=True):
                await _quietly(self.api.release(self.topic, running.msg.id, running.msg.lease))
            raise
        return outcome

    def _what(self, msg: Claimed) -> str:
        return f"tool on {self.topic!r}" + (f" ({msg.workflow_name!r})" if msg.workflow_name else "")

    # ---------------------------------------------------------------------------------------- leases

    def _next_check(self, msg: Claimed, *, retry: bool = False) -> float:
        """When to extend a lease next: at half its length (within a second after a failed try), and just after
        the call's deadline by the local clock (the server's clock decides)."""
        half = self.lease_ms / 2000
        wait = min(half, 1.0) if retry else half
        if msg.deadline is not None:
            left = (msg.deadline - datetime.now(UTC)).total_seconds()
            wait = min(wait, max(left + 0.05, 0.25))
        return anyio.current_time() + wait

    async def _keep_leases(self) -> None:
        """One task keeps the leases of all running handlers: a lease is extended when it is due (``_next_check``)
        or at once when a ``c:<id>`` NOTIFY says the caller cancelled; the handler is stopped when the caller
        cancelled or the deadline passed ("cancelled"), or when the lease was lost ("lost"). A handler that ends
        before half its lease costs no extension and no task of its own."""
        while True:
            now = anyio.current_time()
            due = [r for r in self._running.values() if r.reason is None and (r.check_now or r.due <= now)]
            if due:
                async with anyio.create_task_group() as tg:
                    for running in due:
                        running.check_now = False
                        running.due = math.inf  # in hand
                        tg.start_soon(self._extend, running)
            self._keeper_until = min((r.due for r in self._running.values() if r.reason is None), default=math.inf)
            if any(r.check_now and r.reason is None for r in self._running.values()):
                continue  # a NOTIFY came while extending: look at once (a stopped handler is not looked at)
            with anyio.move_on_after(self._keeper_until - anyio.current_time()):
                await self._keeper_wake.wait()
            self._keeper_wake = anyio.Event()

    async def _extend(self, running: _Running) -> None:
        msg = running.msg
        try:
            state = await self.api.extend(self.topic, msg.id, msg.lease, self.lease_ms)
        except HotMeshError as exc:
            log.warning("could not extend the lease of message %d: %s", msg.id, exc)
            running.due = self._next_check(msg, retry=True)
            return
        if self._running.get(msg.lease) is not running:
            return  # it was answered meanwhile
        if state is None:
            log.warning("lost the lease of message %d on %r; another worker may run it", msg.id, self.topic)
            running.stop("lost")
        elif state:
            running.stop("cancelled")
        else:
            running.due = self._next_check(msg)

    # ------------------------------------------------------------------------------------- answer

    async def _answer(self, running: _Running, outcome: Outcome) -> None:
        msg, stream = running.msg, self.topic
        api = self.api
        if running.reason == "lost":
            return
        if running.reason == "shutdown":
            with anyio.move_on_after(ANSWER_TIMEOUT):
                await _persist(lambda: api.release(stream, msg.id, msg.lease))
            return
        if running.reason == "cancelled":  # the database writes "cancelled by the caller" when it was
            with anyio.move_on_after(ANSWER_TIMEOUT):
                await _persist(lambda: api.fail(stream, msg.id, msg.lease, DEADLINE_TEXT, None))
            return
        kind, value = outcome
        if kind == "ok":
            try:
                ok = await self._answers.submit((running, Answer(msg.id, msg.lease, value)))
            except (InvalidInput, PayloadTooLarge) as exc:
                error = {"error": f"the tool's result was refused: {exc}"}
                ok = await self._answers.submit((running, Answer(msg.id, msg.lease, error, True)))
        elif kind == "refused":
            ok = await self._answers.submit((running, Answer(msg.id, msg.lease, {"error": value}, True)))
        else:
            config = running.config
            retried = config.retry_on is None or isinstance(value, config.retry_on)
            delay = config.retry.next_delay(msg.attempt) if retried else None
            then = (f"retrying in {delay} ms" if delay is not None else "dead-lettered" if retried
                    else "dead-lettered (not an exception its retry_on names)")
            log.warning("%s failed on message %d (attempt %d of %d): %s: %s; %s", self._what(msg), msg.id,
                        msg.attempt + 1, config.retry.maximum_attempts, type(value).__name__,
                        " ".join(_exception_text(value).split())[:300], then)  # one line, whatever the text
            ok = True
            with anyio.move_on_after(ANSWER_TIMEOUT):
                ok = await _persist(lambda: api.fail(stream, msg.id, msg.lease, _exception_text(value), delay))
            if ok and delay is not None and self._handlers is not None:
                self._handlers.start_soon(self._wake_after, delay / 1000)
        if not ok:
            log.warning("message %d on %r was answered by nobody: its lease was lost", msg.id, stream)

    async def _send_answers(self, items: list[tuple[_Running, Answer]]) -> list[bool | BaseException]:
        """One batch of answers, and the next claim for the slots they free (none while stopping). A refused
        batch (a result too large, say) is sent again answer by answer, so each gets its own refusal."""
        held = len(items)
        for running, _ in items:
            running.slot_passed = True  # from here on this statement gives the slot back (or fills it)
        # Only the answered handlers' slots: the free ones stay with the claim loop, which a NOTIFY wakes.
        batch = held if self._backlog and not self._stopping else 0
        news = self._news
        answers = [a for _, a in items]
        claimed: list[Claimed] = []
        try:
            try:
                answered, claimed = await self._respond_and_claim(answers, batch)
                outcomes: list[bool | BaseException] = [answered.get(a.id, False) for a in answers]
            except (InvalidInput, PayloadTooLarge):
                if len(answers) == 1:
                    raise
                outcomes = []
                for a in answers:
                    try:
                        alone, _ = await self._respond_and_claim([a], 0)
                        outcomes.append(alone.get(a.id, False))
                    except HotMeshError as exc:
                        outcomes.append(exc)
        finally:
            self._slots.give(held - len(claimed))
        self._claimed(claimed, asked=batch, news=news)
        return outcomes

    async def _respond_and_claim(self, answers: list[Answer], batch: int) -> tuple[dict[int, bool], list[Claimed]]:
        """``worker_respond_and_dequeue``, retried through connection errors for ``ANSWER_TIMEOUT`` seconds (the
        lease outlives a short outage). A retry claims nothing: the first try may have claimed and committed."""
        tries = 0

        async def attempt() -> tuple[dict[int, bool], list[Claimed]]:
            nonlocal tries
            tries += 1
            return await self.api.respond_and_dequeue(self.topic, self.consumer_id, answers,
                                                      batch if tries == 1 else 0, self.lease_ms, self.workflows,
                                                      self.reclaim_count)

        return await retry_transient(attempt, log=log, what="answering", give_up_after=ANSWER_TIMEOUT)


def _exception_text(exc: BaseException) -> str:
    """An exception as the caller sees it: its message, or its class name when it has none."""
    return str(exc).strip() or type(exc).__name__


async def _persist(call: Callable[[], Awaitable[bool]]) -> bool:
    """Run one answering call, retrying through connection errors (the lease outlives a short outage)."""
    return await retry_transient(call, log=log, what="answering")


async def _quietly(call: Awaitable[Any]) -> None:
    try:
        await call
    except HotMeshError as exc:
        log.debug("ignored: %s", exc)
