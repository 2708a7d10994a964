"""The gateway's engine, free of the MCP SDK: the tool catalog, argument checks, calls and their answers.

``Engine`` logs in as a caller role. It keeps ``caller_tools()`` cached (refreshed when the registry's NOTIFY
channel fires), checks a call's arguments against the registered JSON Schema before anything is enqueued,
enqueues with ``caller_call`` and waits for the answer. Waiting costs no polling per call: ONE LISTEN connection
per process hears ``r:<call_id>`` (ended) and ``p:<call_id>`` (progress) on the caller role's channel and wakes
the waiting call, which then reads its state. Notifications can be lost (a dropped LISTEN connection), so after
a reconnect, and on a slow timer, every waiting call looks again.

Calls that arrive together share statements: enqueues go out through ``caller_call_many``, batched while the
previous one is in flight (``batch.Batcher``); one reader task reads every call marked to look at (by a NOTIFY,
the timer, or a waiter's own poll) in one ``caller_results``. A call alone goes at once. Arguments are encoded
to JSON once: the text measured against the size limit is the text sent.

Every error that reaches an agent goes through ``safe_message``: no SQL, role names, DSNs or tracebacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

import anyio
import anyio.abc
import asyncpg
from jsonschema.exceptions import ValidationError, relevance

from . import _schemas as schemas
from ._batching import Batcher
from ._common import JSON, ProgressReport, clip
from ._config import Pooler
from ._listener import Listener
from ._postgres import JsonText
from ._question_line import Asker, QuestionLine
from ._retry import Backoff
from ._streams import CallerAPI, CallResult, ToolRecord, caller_channel, tools_channel
from .errors import (
    Busy,
    ConnectionFailed,
    DatabaseError,
    HotMeshError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    QuotaExceeded,
    UnknownTool,
)

log = logging.getLogger(__name__)



def safe_message(exc: HotMeshError) -> str:
    """What an agent is told when the gateway's own work failed: the one place errors become text."""
    if isinstance(exc, PermissionDenied):
        return "This server is not allowed to call that tool (its database role does not cover the tool's stream)."
    if isinstance(exc, PayloadTooLarge):
        return "The arguments are larger than the tool service accepts. Send less data."
    if isinstance(exc, ConnectionFailed):
        return "The tool service is unreachable right now (its database connection failed). Try again shortly."
    if isinstance(exc, QuotaExceeded):
        return ("Too many calls to this tool are waiting in its queue for this server. Wait for some to finish, "
                "then call again.")
    if isinstance(exc, Busy):
        return "The tool service is busy with this call right now. Try again shortly."
    if isinstance(exc, InvalidInput):
        return f"The tool service refused the arguments: {exc.message}."
    if isinstance(exc, NotFound):
        return "The tool service lost track of this call. Try the call again."
    if isinstance(exc, DatabaseError):
        return "The tool service failed to handle the call. Try again shortly."
    if isinstance(exc, UnknownTool):
        return exc.message
    return "The tool service failed to handle the call."


OutcomeKind = Literal["ok", "invalid_arguments", "offline", "timeout", "cancelled", "unavailable", "error"]
"""How a call ended, decided where it ended; metrics and logs use it, never the text. ``timeout`` and
``cancelled`` are no failures: the call was stopped (it ended ``expired`` or ``cancelled``, not ``dead``)."""


@dataclass
class Outcome:
    """A finished call: ``result`` (a JSON object) or ``error`` (text the model can read), and its kind."""

    kind: OutcomeKind
    result: dict[str, JSON] | None = None
    error: str | None = None
    call_id: UUID | None = None  # the call in the database (None: refused before it was queued)

    @classmethod
    def refused(cls, exc: HotMeshError) -> Outcome:
        """The gateway's own work failed: the kind of failure, and the text the agent is told."""
        kind: OutcomeKind = "error"
        if isinstance(exc, (ConnectionFailed, Busy)):
            kind = "unavailable"
        elif isinstance(exc, (InvalidInput, PayloadTooLarge)):
            kind = "invalid_arguments"
        return cls(kind, error=safe_message(exc))


@dataclass
class _Entry:
    """A tool in the catalog: its latest record and the cached verdict on its definition."""

    record: ToolRecord
    checked: schemas.Checked


def _measured(record: ToolRecord) -> tuple[str, str | None]:
    """The definition key of a record and why it is past the limits (None: within them). Its cost is bounded by
    the limits, and it never raises, whatever the row holds."""
    try:
        problem = schemas.bounds(record.name, record.description, record.input_schema, record.output_schema)
        key = schemas.definition_key(record.name, record.description, record.input_schema, record.output_schema,
                                     problem)
    except Exception:  # unexpected (both are total on JSON): still one unusable tool, not a failed refresh
        problem = "its registered definition cannot be read"
        key = schemas.definition_key(record.name, None, None, None, problem)
    return key, problem


def _check(record: ToolRecord, key: str, problem: str | None) -> schemas.Checked:
    """The verdict on a record's definition; in a worker thread (slow on a large schema)."""
    try:
        checked = schemas.check(key, problem, record.input_schema, record.output_schema)
    except Exception:  # a bug must cost one tool, never the catalog (or the gateway's start)
        log.exception("tool %r could not be checked", clip(record.name, 80))
        checked = schemas.Checked(key, "its registered definition could not be checked")
    if checked.problem is not None:  # once per definition: the verdict is cached for as long as it is registered
        log.warning("tool %r of stream %r is not listed: %s", clip(record.name, 80), clip(record.stream, 80),
                    checked.problem)
    return checked


@dataclass(eq=False)
class _Waiter:
    """A call waiting for its answer. The reader sets ``result`` (a finished call) or ``error``, then ``done``."""

    report: ProgressReport | None
    done: anyio.Event = field(default_factory=anyio.Event)
    result: CallResult | None = None
    error: HotMeshError | None = None
    last_progress: float | None = None
    questions: QuestionLine | None = None  # the handler's questions to the agent's client


def describe_errors(errors: list[ValidationError], limit: int = 5) -> str:
    """Schema violations as short lines the model can act on."""
    parts = []
    for e in sorted(errors, key=relevance)[:limit]:
        where = "/".join(str(p) for p in e.absolute_path)
        message = e.message if len(e.message) <= 200 else e.message[:120] + " ... " + e.message[-75:]  # the
        parts.append(f"{where or '(top level)'}: {message}")  # end says what is wrong: keep it
    at_least = "at least " if len(errors) >= schemas.MAX_ERRORS else ""  # a check collects no more than that
    more = f" (and {at_least}{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


def _timeout(name: str, limit: float) -> Outcome:
    return Outcome("timeout", error=f"Tool {name!r} did not finish within {limit:g} seconds; the call was cancelled.")


def _error_text(res: CallResult) -> str:
    """The handler's own message for a failed call."""
    value = res.result
    if isinstance(value, dict):
        for key in ("message", "error"):
            if isinstance(value.get(key), str) and value[key]:
                return clip(value[key], 4000)
    if isinstance(value, str) and value:
        return clip(value, 4000)
    if res.error:
        return clip(res.error, 4000)
    if value is not None:
        return clip(json.dumps(value), 4000)
    return "the tool failed without a message"


INLINE_VALIDATION_BYTES = 4 * 1024
INLINE_VALIDATION_STEPS = 1_000
INLINE_VALIDATION_SECONDS = 0.01
"""Arguments of at most 4 KiB of JSON are checked on the event loop, for at most 1,000 steps or 10 ms, whichever
comes first: what nearly every call needs (echo spends 8 steps, about 10 µs; a 10-point ``iso_shape`` of the
tests 123). A check that needs more starts again in a worker thread with its whole budget, as do larger
arguments: 60 KB of pydantic objects took 58 ms of the event loop before, and a thread costs about 60 µs."""
VALIDATION_THREADS = 2
"""Argument checks running in worker threads at once. They hold the GIL in turns with the event loop, so each one
more adds up to 5 ms to how long the loop may wait for it."""
VALIDATION_SECONDS = 10.0
"""A backstop after the step budget: no check of arguments runs longer (528 KB of pydantic objects reached through
a ``$ref`` take 0.8 s)."""

EARLY_NOTIFICATIONS = 4096
ENQUEUE_BATCH = 8
"""Most calls one caller_call_many carries. Calls answered together are asked again together (the agents get
their answers in the same moment), so without a cap they travel as one convoy: the gateway prepares all of them
while the database and the worker wait, then waits while they work. Batches of 8 split such a wave, and the
stages overlap: one batch is in the database while the gateway prepares the next. Measured at 16 concurrent
calls: about 1,300 calls/s instead of about 1,050 (benchmarks.profile)."""
READ_BATCH = 500
REFRESH_MIN_INTERVAL = 0.5
"""Seconds between two refreshes of the catalog woken by the registry's NOTIFY (a call to a tool not yet known
refreshes at once)."""


class Engine:
    """The caller-role side of every tool call; one per gateway process.

    ``listen_dsn``: its LISTEN connection's DSN. ``pool_dsn`` (default: ``listen_dsn``) and ``pooler`` say how
    ``pool`` was made, so that the engines an identity gateway makes for other caller roles connect alike."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str,
        role: str,
        listen_dsn: str,
        pool_dsn: str | None = None,
        pooler: Pooler | None = None,
        timeout: float = 60.0,
        max_args_bytes: int = 1 << 20,
        recheck_interval: float = 5.0,
        refresh_interval: float = 30.0,
    ) -> None:
        self.api = CallerAPI(pool, schema)
        self.dsn = pool_dsn or listen_dsn
        self.listen_dsn = listen_dsn
        self.pooler = pooler
        self.schema = schema
        self.role = role
        self.timeout = timeout
        self.max_args_bytes = max_args_bytes
        self.recheck_interval = recheck_interval
        self.refresh_interval = refresh_interval
        self.on_tools_changed: Callable[[], Awaitable[None]] | None = None
        self._tools: dict[str, _Entry] = {}
        self._waiters: dict[UUID, _Waiter] = {}
        # r:/p: notifications that came before their call's waiter (the worker can answer before caller_call's
        # reply is read): the waiter looks at once instead of at the next timer tick. Bounded: ids of calls of
        # other gateways logged in as the same role land here too.
        self._early: dict[UUID, None] = {}
        self._enqueues: Batcher[tuple[str, str, JSON, int], UUID] = Batcher(
            self._send_calls, on_orphan=self._orphaned, max_size=ENQUEUE_BATCH
        )
        # Calls to look at: the reader reads them all in one caller_results statement.
        self._to_read: dict[UUID, None] = {}
        self._read_wake = anyio.Event()
        self._dirty = anyio.Event()
        self._refresh_lock = anyio.Lock()
        self._calls_channel = caller_channel(schema, role)
        self._tools_channel = tools_channel(schema)
        self.listener = Listener(
            listen_dsn, [self._calls_channel, self._tools_channel], self._on_notify,
            on_reconnect=self._on_reconnect, check_interval=recheck_interval,
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._validation_threads: anyio.CapacityLimiter | None = None  # made on first use, inside the event loop

    # ---------------------------------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Engine:
        await self.refresh(notify=False)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self.listener.run)
        await self._tg.start(self._enqueues.run)
        self._tg.start_soon(self._reader)
        self._tg.start_soon(self._refresher)
        self._tg.start_soon(self._ticker)
        self._tg.start_soon(self._question_scanner)
        with anyio.move_on_after(10):
            await self.listener.connected.wait()
        if not self.listener.connected.is_set():
            log.warning("the LISTEN connection is not up yet; calls will be checked on a timer until it is")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == self._tools_channel:
            self._dirty.set()
            return
        kind, _, ident = payload.partition(":")
        if kind not in ("r", "p", "q"):
            return
        try:
            call_id = UUID(ident)
        except ValueError:
            return
        if call_id in self._waiters:
            if kind == "q":  # a handler asks the client a question
                self._ask(call_id)
                return
            self._look_at(call_id)
        else:
            self._early[call_id] = None
            if len(self._early) > EARLY_NOTIFICATIONS:
                del self._early[next(iter(self._early))]

    def _ask(self, call_id: UUID) -> None:
        """Serve the pending question of a waiting call, if there is one (``QuestionLine``)."""
        waiter = self._waiters.get(call_id)
        if waiter is not None and waiter.questions is not None and self._tg is not None:
            waiter.questions.look(self._tg)

    def _look_at(self, call_id: UUID) -> None:
        self._to_read[call_id] = None
        self._read_wake.set()

    def wake_all(self) -> None:
        """Every waiting call is read again (a lost NOTIFY, a reconnect)."""
        for call_id in list(self._waiters):
            self._look_at(call_id)

    async def _on_reconnect(self) -> None:
        # notifications sent while the connection was down are lost: look at everything again
        self.wake_all()
        self._dirty.set()

    async def _refresher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            await anyio.sleep(0.05)  # let a burst of registrations settle into one refresh
            try:
                await self.refresh()
            except HotMeshError as exc:
                log.warning("could not refresh the tool list: %s", exc)
                await anyio.sleep(1)
                self._dirty.set()
            # Any role can NOTIFY the registry's channel, and a worker can change its tool in a loop: each refresh
            # re-reads the catalog and may tell every client the list changed. At most one per interval.
            await anyio.sleep(REFRESH_MIN_INTERVAL)

    async def _ticker(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await anyio.sleep(self.recheck_interval)
            self.wake_all()  # the safety net for a missed NOTIFY
            if time.monotonic() - last_refresh >= self.refresh_interval:
                last_refresh = time.monotonic()
                self._dirty.set()  # live-worker counts age without a NOTIFY

    async def _question_scanner(self) -> None:
        """The safety net for a lost ``q:`` NOTIFY: every ``recheck_interval``, one statement finds the waiting calls
        whose handler asks a question."""
        while True:
            await anyio.sleep(self.recheck_interval)
            waiting = list(self._waiters)
            for start in range(0, len(waiting), READ_BATCH):
                try:
                    asking = await self.api.requests(waiting[start:start + READ_BATCH])
                except HotMeshError as exc:
                    log.debug("looking for questions: %s", exc)
                    break
                for call_id in asking:
                    self._ask(call_id)

    # ------------------------------------------------------------------------------------------ catalog
    async def refresh(self, *, notify: bool = True) -> bool:
        """Re-read ``caller_tools()``; returns whether the tool definitions changed (and tells listeners).

        Registered definitions are untrusted (see ``schemas``): each is measured, and checked once per distinct
        definition, in worker threads, so a large schema holds up no other request. tools/list and calls only
        read the cached verdicts."""
        async with self._refresh_lock:
            records = await self.api.tools()
            measured = await anyio.to_thread.run_sync(lambda: [_measured(r) for r in records])
            known = {e.checked.key: e.checked for e in self._tools.values()}
            new: dict[str, _Entry] = {}
            for record, (key, problem) in zip(records, measured, strict=True):
                checked = known.get(key)
                if checked is None:
                    checked = known[key] = await anyio.to_thread.run_sync(_check, record, key, problem)
                new[record.name] = _Entry(record, checked)
            changed = sorted((n, e.checked.key) for n, e in new.items()) != sorted(
                (n, e.checked.key) for n, e in self._tools.items())
            self._tools = new
        if changed and notify and self.on_tools_changed is not None:
            await self.on_tools_changed()
        return changed

    @property
    def catalog_version(self) -> object:
        """Changes whenever ``refresh`` replaces the catalog (and only then): what a cache of anything built from
        ``tools()`` or ``listable()`` is keyed on."""
        return self._tools

    def tools(self) -> list[ToolRecord]:
        """The cached catalog, by name: every registered tool, listable or not."""
        return [e.record for e in sorted(self._tools.values(), key=lambda e: e.record.name)]

    def listable(self) -> list[ToolRecord]:
        """The tools an agent may see, by name: those whose definitions passed the checks. A host may refuse a
        whole tool list for one bad schema, so a tool that did not pass is left out (and a call to it says why).
        Each with its output schema as hosts get it (``_schemas.for_hosts``)."""
        return [dataclasses.replace(r, output_schema=self._tools[r.name].checked.output_for_hosts)
                for r in self.tools() if self._tools[r.name].checked.problem is None]

    def input_schema(self, name: str) -> dict[str, Any] | None:
        """A listable tool's input schema; None for an unknown tool or one that did not pass the checks."""
        entry = self._tools.get(name)
        return entry.record.input_schema if entry is not None and entry.checked.problem is None else None

    async def _entry(self, name: str) -> _Entry:
        entry = self._tools.get(name)
        if entry is None:  # maybe registered a moment ago
            await self.refresh()
            entry = self._tools.get(name)
        if entry is None:
            raise UnknownTool(f"Unknown tool: {clip(repr(name), 80)}. List the tools again to see what is available.")
        return entry

    # -------------------------------------------------------------------------------------------- calls
    async def check(self, name: str, arguments: dict[str, JSON] | None) -> tuple[_Entry, JsonText] | Outcome:
        """The tool and its arguments as JSON text, or the refused call's outcome (nothing is enqueued). Raises
        ``UnknownTool``."""
        entry = await self._entry(name)
        args = arguments if arguments is not None else {}
        try:
            text = json.dumps(args, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            size = len(text.encode())
        except RecursionError:
            return Outcome("invalid_arguments", error=f"The arguments for {name!r} are nested too deeply.")
        except UnicodeEncodeError:
            return Outcome("invalid_arguments", error=f"The arguments for {name!r} are not valid JSON: a string "
                           "holds a lone surrogate (no UTF-8).")
        except (TypeError, ValueError) as exc:
            why = "NaN or an infinite number" if "float" in str(exc) else (
                "a number with too many digits" if "digits" in str(exc) else "a value that is no JSON")
            return Outcome("invalid_arguments",
                           error=f"The arguments for {name!r} are not valid JSON: they hold {why}.")
        if size > self.max_args_bytes:
            return Outcome("invalid_arguments", error=f"The arguments for {name!r} are {size} bytes of JSON; this "
                           f"server accepts at most {self.max_args_bytes}. Send less data.")
        checked = entry.checked
        if checked.validator is None:
            problem = checked.problem or "its registered input schema is invalid"
            return Outcome("error", error=f"Tool {name!r} cannot be called: {problem}.")
        try:
            errors = await self._validate(checked.validator, args, len(text), size)
            invalid = describe_errors(errors) if errors else None
        except schemas.TooCostly as exc:
            log.warning("tool %r: checking %d bytes of arguments against its input schema took more than %d steps",
                        clip(name, 80), size, exc.steps)
            return Outcome("invalid_arguments", error=(
                f"Tool {name!r} cannot be called with these arguments: they are too costly to check against the "
                "tool's registered input schema (this server stops after a bounded amount of work), so nothing was "
                "sent. Smaller arguments may pass; if not, tell the user the tool's schema is too complex to use."))
        except Exception as exc:  # an unresolvable reference (nothing is ever retrieved), a reference loop
            log.warning("tool %r: its input schema could not be applied (%s)", name, type(exc).__name__)
            return Outcome("error", error=(
                f"Tool {name!r} cannot be called: its registered input schema could not be applied to the "
                "arguments (it refers to something it does not contain, or to itself without end)."))
        if invalid is not None:
            return Outcome("invalid_arguments",
                           error=f"Invalid arguments for {name!r}: {invalid}. Fix the arguments and call again.")
        if entry.record.live_workers == 0:
            await self.refresh()  # a worker may have started a moment ago
            entry = self._tools.get(name, entry)
            if entry.record.live_workers == 0:
                return Outcome("offline", error=(
                    f"Tool {name!r} is offline: no worker is running for it right now, so the call was not sent. "
                    "Try again later, or tell the user the service behind this tool is not running."))
        return entry, JsonText(text)

    async def _validate(self, validator: schemas.ArgumentValidator, args: JSON, chars: int,
                        size: int) -> list[ValidationError]:
        """The schema violations of ``args`` (JSON text of ``chars`` characters, ``size`` bytes), at a bounded cost:
        raises ``schemas.TooCostly`` past ``schemas.validation_steps(chars)`` steps. Small arguments are checked on
        the event loop, within ``INLINE_VALIDATION_STEPS``: what nearly every call needs. Larger ones, and any check
        that needs more, run in a worker thread, at most ``VALIDATION_THREADS`` at once (a thread holding the GIL
        shares it with the event loop every 5 ms, so the loop stays responsive)."""
        steps = schemas.validation_steps(chars)
        if size <= INLINE_VALIDATION_BYTES:
            with contextlib.suppress(schemas.TooCostly):  # then in a thread, with its whole budget
                return validator.errors(args, min(steps, INLINE_VALIDATION_STEPS), seconds=INLINE_VALIDATION_SECONDS)
        if self._validation_threads is None:
            self._validation_threads = anyio.CapacityLimiter(VALIDATION_THREADS)
        return await anyio.to_thread.run_sync(
            lambda: validator.errors(args, steps, seconds=VALIDATION_SECONDS), limiter=self._validation_threads)

    async def call(
        self, name: str, arguments: dict[str, JSON] | None, *, report: ProgressReport | None = None,
        time_limit: float | None = None, idempotency_key: str | None = None, asker: Asker | None = None,
        on_enqueued: Callable[[UUID], object] | None = None,
    ) -> Outcome:
        """Check, enqueue, wait, answer. Cancelling the caller cancels the call in the database. The time limit is
        ``time_limit``, else the tool's own timeout (capped by the admin), else the engine's. With an
        ``idempotency_key`` (scoped to this caller role) a repeated call is the first one: its answer, or, while
        it runs, a wait for it. ``asker`` asks the agent's client the handler's questions (``_questions``);
        without one they are answered "unavailable". ``on_enqueued`` hears the call's id once it is queued (a
        keep-alive follows it)."""
        if idempotency_key is not None and not (isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 200):
            return Outcome("invalid_arguments", error="The idempotency key must be a string of 1 to 200 characters.")
        checked = await self.check(name, arguments)
        if isinstance(checked, Outcome):
            return checked
        entry, args = checked
        record = entry.record
        limit = self._limit(record, time_limit)
        call = (record.stream, record.workflow_name, args, max(1, int(limit * 1000)))
        try:
            call_id = await (self._enqueues.submit(call) if idempotency_key is None
                             else self.api.call(*call, idempotency_key))
        except HotMeshError as exc:
            return Outcome.refused(exc)
        first = self._waiters.get(call_id)
        if first is not None:  # the same key's first call waits in this gateway: share its answer
            return await self._wait_for_first(name, first, limit)
        waiter = self._waiters[call_id] = _Waiter(report)
        waiter.questions = QuestionLine(self.api, call_id, asker, time.monotonic() + limit)
        if call_id in self._early or idempotency_key is not None:  # its NOTIFY came, or it may have ended long ago
            self._early.pop(call_id, None)
            self._look_at(call_id)
            self._ask(call_id)
        if on_enqueued is not None:
            on_enqueued(call_id)
        try:
            outcome = await self._wait(name, call_id, waiter, limit)
            outcome.call_id = call_id
            return outcome
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._cancel(call_id)
            raise
        finally:
            self._waiters.pop(call_id, None)
            waiter.questions.close()  # a question still open with the client is withdrawn

    def _limit(self, record: ToolRecord, time_limit: float | None) -> float:
        """A call's time limit in seconds: ``time_limit``, else the tool's own timeout (capped by the admin when
        it was registered), else the engine's default (``--timeout``)."""
        if time_limit is not None:
            return time_limit
        return record.timeout_ms / 1000 if record.timeout_ms else self.timeout

    async def _wait_for_first(self, name: str, first: _Waiter, limit: float) -> Outcome:
        """A repeated call waiting for the first call of its idempotency key, which another request waits for."""
        with anyio.move_on_after(limit):
            await first.done.wait()
        if first.result is not None:
            return self._outcome(first.result)
        if first.error is not None:
            return Outcome.refused(first.error)
        return Outcome("timeout", error=f"Tool {name!r} did not finish within {limit:g} seconds.")

    async def start(self, name: str, arguments: dict[str, JSON] | None, *,
                    time_limit: float | None = None) -> tuple[UUID, float] | Outcome:
        """Check a call and enqueue it durably, for a call that outlives its request (a task): its id and time
        limit in seconds, or the refused call's outcome (nothing is enqueued). Raises ``UnknownTool``."""
        checked = await self.check(name, arguments)
        if isinstance(checked, Outcome):
            return checked
        entry, args = checked
        limit = self._limit(entry.record, time_limit)
        try:
            call_id = await self.api.call_durable(entry.record.stream, entry.record.workflow_name, args,
                                                  max(1, int(limit * 1000)))
        except HotMeshError as exc:
            return Outcome.refused(exc)
        return call_id, limit

    async def follow(self, call_id: UUID, *, seconds: float | None = None) -> Outcome | None:
        """Wait for a call made earlier (by any gateway of this role) to end, ``seconds`` at most (None: until
        it ends): its outcome, or None while it still runs. Leaving does not cancel the call. Raises ``NotFound``
        for a call of another role, or none."""
        until = None if seconds is None else time.monotonic() + seconds
        while True:
            waiter = self._waiters.get(call_id)
            mine = waiter is None
            if waiter is None:
                waiter = self._waiters[call_id] = _Waiter(None)
            self._look_at(call_id)
            wait = self.recheck_interval * 2 if until is None else min(self.recheck_interval * 2,
                                                                      until - time.monotonic())
            try:
                with anyio.move_on_after(max(wait, 0)):
                    await waiter.done.wait()
            finally:
                if mine and self._waiters.get(call_id) is waiter:
                    del self._waiters[call_id]
            if waiter.result is not None:
                return self._outcome(waiter.result)
            if waiter.error is not None:
                raise waiter.error
            if until is not None and time.monotonic() >= until:
                return None

    async def _send_calls(self, calls: list[tuple[str, str, JSON, int]]) -> list[UUID | BaseException]:
        """One batch of enqueues. A refused batch is sent again call by call, so each call gets its own answer."""
        try:
            return list(await self.api.call_many(calls))
        except HotMeshError as exc:
            if len(calls) == 1 or isinstance(exc, ConnectionFailed):
                return [exc] * len(calls)
        outcomes: list[UUID | BaseException] = []
        for call in calls:
            try:
                outcomes.append(await self.api.call(*call))
            except HotMeshError as exc:
                outcomes.append(exc)
        return outcomes

    def _orphaned(self, _call: tuple[str, str, JSON, int], call_id: UUID) -> None:
        """A call enqueued for a caller that was cancelled meanwhile: cancel it in the database too."""
        if self._tg is not None:
            self._tg.start_soon(self._cancel, call_id)

    async def _reader(self) -> None:
        """Reads the calls marked to look at (by a NOTIFY, the timer or a waiter's own poll), all of them in one
        statement, and wakes each finished one; progress goes to its reporter."""
        backoff = Backoff(cap=self.recheck_interval)
        while True:
            await self._read_wake.wait()
            self._read_wake = anyio.Event()
            while self._to_read:
                taken = list(itertools.islice(self._to_read, READ_BATCH))
                for call_id in taken:
                    del self._to_read[call_id]
                batch = [i for i in taken if i in self._waiters]
                if not batch:
                    continue
                try:
                    found = await self.api.results(batch)
                    backoff = Backoff(cap=self.recheck_interval)
                except ConnectionFailed as exc:  # look again soon; a waiter that times out asks on its own
                    delay, level = backoff.failed(exc)
                    log.log(level, "reading %d call(s): %s", len(batch), exc)
                    for call_id in batch:
                        self._to_read.setdefault(call_id, None)
                    await anyio.sleep(delay)
                    continue
                except HotMeshError as exc:
                    found, error = {}, exc
                except Exception:  # a bug must fail these calls, not stop every later read
                    log.exception("reading %d call(s) failed", len(batch))
                    found, error = {}, DatabaseError("the database could not complete the request")
                else:
                    error = NotFound("no such call")
                for call_id in batch:
                    waiter = self._waiters.get(call_id)
                    if waiter is not None:
                        self._deliver(call_id, waiter, found.get(call_id), error)

    def _deliver(self, call_id: UUID, waiter: _Waiter, res: CallResult | None, error: HotMeshError) -> None:
        if res is None:
            waiter.error = error
            waiter.done.set()
        elif res.finished:
            waiter.result = res
            waiter.done.set()
        elif waiter.report is not None and res.progress is not None and (
            waiter.last_progress is None or res.progress > waiter.last_progress
        ):
            waiter.last_progress = res.progress
            if self._tg is not None:
                self._tg.start_soon(self._report, call_id, waiter.report, res)

    async def _report(self, call_id: UUID, report: ProgressReport, res: CallResult) -> None:
        if call_id in self._waiters and res.progress is not None:
            await report(res.progress, res.progress_total, res.progress_message)

    async def _cancel(self, call_id: UUID) -> str | None:
        try:
            return await self.api.cancel(call_id)
        except HotMeshError as exc:
            log.warning("could not cancel call %s: %s", call_id, exc)
            return None

    async def _wait(self, name: str, call_id: UUID, waiter: _Waiter, limit: float) -> Outcome:
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return await self._timed_out(name, call_id, limit)
            # No read before the answer's NOTIFY (or the timer's, if one is lost) marks the call for the reader.
            with anyio.move_on_after(min(remaining, self.recheck_interval * 2)):
                await waiter.done.wait()
            if waiter.result is not None:
                if waiter.result.state == "expired":  # its worker saw the deadline pass first
                    return _timeout(name, limit)
                return self._outcome(waiter.result)
            if waiter.error is not None:
                return Outcome.refused(waiter.error)
            self._look_at(call_id)  # nothing heard for a while: look anyway

    async def _timed_out(self, name: str, call_id: UUID, limit: float) -> Outcome:
        state = await self._cancel(call_id)
        if state == "done":  # it finished just now: the answer is there
            try:
                res = await self.api.result(call_id)
                if res.finished:
                    return self._outcome(res)
            except HotMeshError:
                pass
        return _timeout(name, limit)

    @staticmethod
    def _outcome(res: CallResult) -> Outcome:
        if res.state == "expired":
            return Outcome("timeout", error="The call did not finish within its time limit, so it was stopped.")
        if res.state == "cancelled":
            return Outcome("cancelled", error="The call was cancelled before it finished.")
        if res.state == "done" and not res.is_error:
            value = res.result
            return Outcome("ok", result=value if isinstance(value, dict) else {"result": value})
        return Outcome("error", error=_error_text(res))

    outcome_of = _outcome  # how a finished call ended, as its caller is told (a task's result)

    async def healthy(self) -> bool:
        """Whether the database answers through the caller pool."""
        try:
            with anyio.fail_after(3):
                await self.api.pool.fetchval("SELECT 1")
            return True
        except Exception:
            return False
