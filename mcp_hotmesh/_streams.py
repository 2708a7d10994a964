"""The stream API: one Python method per SQL function of SQL API v1.

``WorkerAPI`` is what a worker role can do, ``CallerAPI`` what a caller role can do. Each takes a pool and the
schema; each method is one prepared function call, with errors translated. Nothing here touches a table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ._common import JSON
from ._config import check_schema
from ._postgres import room_of, translated
from .errors import SchemaOutdated


def worker_channel(schema: str, stream: str) -> str:
    """The channel a stream's workers LISTEN on (a hash: any stream name fits in 63 bytes)."""
    return f"{schema}_w_{hashlib.md5(stream.encode()).hexdigest()[:16]}"


def caller_channel(schema: str, role: str) -> str:
    """The channel on which a caller role hears that its calls progressed (``p:<id>``) or ended (``r:<id>``)."""
    return f"{schema}_r_{hashlib.md5(role.encode()).hexdigest()[:16]}"


def consumer_channel(schema: str, consumer: str) -> str:
    """The channel on which one worker process (``consumer`` id) is woken for a new call: the payload is the
    channel of the call's stream (``_consumer_channel``; a hash, as the id names a host)."""
    return f"{schema}_c_{hashlib.md5(consumer.encode()).hexdigest()[:16]}"


def tools_channel(schema: str) -> str:
    """The channel on which gateways hear that the tool registry or the live workers changed."""
    return f"{schema}_tools"


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message a worker holds the lease of."""

    stream: str
    id: int
    lease: UUID
    workflow_name: str
    args: JSON
    attempt: int
    reclaims: int
    deadline: datetime | None


@dataclass(frozen=True, slots=True)
class Answer:
    """A result for a held message, as ``worker_respond`` takes it."""

    id: int
    lease: UUID
    result: JSON
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class ToolRecord:
    stream: str
    workflow_name: str
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    live_workers: int
    title: str | None = None
    annotations: dict[str, Any] | None = None
    icons: list[Any] | None = None
    meta: dict[str, Any] | None = None
    timeout_ms: int | None = None  # the tool's own, capped by the admin's max_tool_timeout_ms


@dataclass(frozen=True, slots=True)
class Question:
    """A running handler's question to the calling client (``caller_request``): untrusted until checked."""

    call_id: UUID
    seq: int
    kind: str  # "elicit" or "sample"
    request: JSON
    deadline: datetime | None


@dataclass(frozen=True, slots=True)
class EndedSession:
    """A session the watchdog ended (``<kind>_watchdog()``)."""

    role: str
    pid: int
    reason: str  # idle in a transaction, a transaction open too long, an advisory lock held
    seconds: float  # how long its transaction had been open (0: none)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One stream of the caller role's allow-list, as ``caller_stats()`` counts it (for ``/metrics``)."""

    stream: str
    ready: int
    in_flight: int
    retrying: int
    dead: int
    oldest_ready_seconds: float | None


@dataclass(frozen=True, slots=True)
class CallResult:
    """A call's state: ``ready`` (queued), ``reserved`` (running), ``done``, ``dead`` (failed: the dead-letter
    queue), ``cancelled`` (by its caller) or ``expired`` (past its deadline)."""

    state: str
    result: JSON
    is_error: bool
    error: str | None
    attempt: int
    progress: float | None
    progress_total: float | None
    progress_message: str | None
    deadline: datetime | None

    @property
    def finished(self) -> bool:
        return self.state in ENDED


ENDED = frozenset({"done", "dead", "cancelled", "expired"})
"""The states a call ends in."""


@dataclass(frozen=True, slots=True)
class CallStatus:
    """A call as a task or a keep-alive sees it (``caller_call_status``): its state and answer, its times, and
    while it is queued how many calls of its stream are ahead of it (counted up to 1000)."""

    state: str
    result: JSON
    is_error: bool
    error: str | None
    progress: float | None
    progress_total: float | None
    progress_message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline: datetime | None
    ahead: int | None

    @property
    def finished(self) -> bool:
        return self.state in ENDED

    def as_result(self) -> CallResult:
        return CallResult(self.state, self.result, self.is_error, self.error, 0, self.progress,
                          self.progress_total, self.progress_message, self.deadline)


def _claimed(stream: str, r: asyncpg.Record) -> Claimed:
    return Claimed(stream, r["id"], r["lease"], r["workflow_name"], r["args"], r["attempt"], r["reclaims"],
                   r["deadline"])


def _call_result(r: asyncpg.Record) -> CallResult:
    return CallResult(r["state"], r["result"], r["is_error"], r["error"], r["attempt"], r["progress"],
                      r["progress_total"], r["progress_message"], r["deadline"])


METADATA = ("title", "annotations", "icons", "meta", "timeout_ms")


class _API:
    kind: str  # the prefix of this role kind's functions: worker_ or caller_

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection, schema: str = "hotmesh") -> None:
        self.pool = pool  # a pool, or one connection (the admin's, in the seed's standard mode)
        self.schema = check_schema(schema)
        self._s = f'"{schema}"'

    async def purge(self) -> int:
        """One bounded purge of the finished calls of this role's streams (``<kind>_purge()``); rows deleted."""
        value: int = await self._val(f"SELECT {self._s}.{self.kind}_purge()")
        return value

    async def watchdog(self) -> list[EndedSession]:
        """End the scoped sessions that hold a transaction open too long or an advisory lock
        (``<kind>_watchdog()``)."""
        rows = await self._rows(f"SELECT * FROM {self._s}.{self.kind}_watchdog()")
        return [EndedSession(r["role_name"], r["pid"], r["reason"], r["seconds"]) for r in rows]

    async def _val(self, sql: str, *args: Any, stream: str | None = None) -> Any:
        with translated(stream=stream):
            if isinstance(self.pool, asyncpg.Connection):
                return await self.pool.fetchval(sql, *args)
            pool = self.pool
            return await room_of(pool).run(lambda: pool.fetchval(sql, *args))

    async def _rows(self, sql: str, *args: Any, stream: str | None = None) -> list[asyncpg.Record]:
        with translated(stream=stream):
            if isinstance(self.pool, asyncpg.Connection):
                return await self.pool.fetch(sql, *args)
            pool = self.pool
            return await room_of(pool).run(lambda: pool.fetch(sql, *args))


class WorkerAPI(_API):
    """The worker_* functions, as a worker role (or the admin, in the seed's standard mode) calls them."""

    kind = "worker"

    async def dequeue(
        self,
        stream: str,
        consumer: str,
        batch: int,
        lease_ms: int,
        workflows: list[str] | None = None,
        reclaim_count: int = 3,
    ) -> list[Claimed]:
        rows = await self._rows(
            f"SELECT * FROM {self._s}.worker_dequeue($1, $2, $3, $4, $5, $6)",
            stream, consumer, batch, lease_ms, workflows, reclaim_count, stream=stream,
        )
        return [_claimed(stream, r) for r in rows]

    async def respond(self, stream: str, id: int, lease: UUID, result: JSON, is_error: bool = False) -> bool:
        return bool(
            await self._val(
                f"SELECT {self._s}.worker_respond($1, $2, $3, $4, $5)", stream, id, lease, result, is_error,
                stream=stream,
            )
        )

    async def respond_and_dequeue(
        self,
        stream: str,
        consumer: str,
        answers: list[Answer],
        batch: int,
        lease_ms: int,
        workflows: list[str] | None = None,
        reclaim_count: int = 3,
    ) -> tuple[dict[int, bool], list[Claimed]]:
        """Answer held messages and claim up to ``batch`` more in one round trip (``worker_respond_and_dequeue``).
        Returns whether each answer was written (False: the lease was lost), by message id, and the claimed."""
        rows = await self._rows(
            f"SELECT * FROM {self._s}.worker_respond_and_dequeue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            stream, consumer, [a.id for a in answers], [a.lease for a in answers], [a.result for a in answers],
            [a.is_error for a in answers], batch, lease_ms, workflows, reclaim_count, stream=stream,
        )
        answered: dict[int, bool] = {}
        claimed: list[Claimed] = []
        for r in rows:
            if r["kind"] == "claimed":
                claimed.append(_claimed(stream, r))
            else:
                answered[r["id"]] = r["kind"] == "answered"
        return answered, claimed

    async def fail(self, stream: str, id: int, lease: UUID, error: str, retry_in_ms: int | None) -> bool:
        return bool(
            await self._val(
                f"SELECT {self._s}.worker_fail($1, $2, $3, $4, $5)", stream, id, lease, error, retry_in_ms,
                stream=stream,
            )
        )

    async def extend(self, stream: str, id: int, lease: UUID, lease_ms: int) -> bool | None:
        """True: the caller cancelled (or the deadline passed). False: go on. None: the lease was lost."""
        value = await self._val(
            f"SELECT {self._s}.worker_extend($1, $2, $3, $4)", stream, id, lease, lease_ms, stream=stream
        )
        return None if value is None else bool(value)

    async def progress(
        self, stream: str, id: int, lease: UUID, progress: float, total: float | None, message: str | None
    ) -> bool:
        return bool(
            await self._val(
                f"SELECT {self._s}.worker_progress($1, $2, $3, $4, $5, $6)",
                stream, id, lease, progress, total, message, stream=stream,
            )
        )

    async def release(self, stream: str, id: int, lease: UUID) -> bool:
        return bool(
            await self._val(f"SELECT {self._s}.worker_release($1, $2, $3)", stream, id, lease, stream=stream)
        )

    async def publish(self, stream: str, workflow_name: str, args: JSON) -> int:
        value: int = await self._val(
            f"SELECT {self._s}.worker_publish($1, $2, $3)", stream, workflow_name, args, stream=stream
        )
        return value

    async def register_tool(self, stream: str, workflow_name: str, tool: dict[str, Any]) -> bool:
        return bool(
            await self._val(
                f"SELECT {self._s}.worker_register_tool($1, $2, $3)", stream, workflow_name, tool, stream=stream
            )
        )

    async def register_definition(self, stream: str, workflow_name: str, tool: dict[str, Any]) -> str:
        """``worker_register_definition``: 'unchanged', 'live' or 'pending' (it waits for an admin's approval)."""
        try:
            value: str = await self._val(
                f"SELECT {self._s}.worker_register_definition($1, $2, $3)", stream, workflow_name, tool, stream=stream
            )
        except SchemaOutdated:  # a schema an earlier version made (a rolling upgrade): the first form
            return "live" if await self.register_tool(stream, workflow_name, tool) else "unchanged"
        return value

    async def register_tools(self, tools: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
        """Many ``(stream, workflow_name, tool)`` in one statement (``worker_register_tools``): each one's state,
        as ``register_definition`` says it."""
        streams, names, defs = [list(column) for column in zip(*tools, strict=True)] if tools else ([], [], [])
        value: list[str] = await self._val(f"SELECT {self._s}.worker_register_tools($1, $2, $3)", streams, names, defs,
                                     stream=streams[0] if len(streams) == 1 else None)
        return value

    async def unregister_tool(self, stream: str, workflow_name: str) -> bool:
        return bool(
            await self._val(
                f"SELECT {self._s}.worker_unregister_tool($1, $2)", stream, workflow_name, stream=stream
            )
        )

    async def heartbeat(self, streams: list[str], consumer: str, ttl_ms: int) -> int:
        value: int = await self._val(
            f"SELECT {self._s}.worker_heartbeat($1, $2, $3)", streams, consumer, ttl_ms,
            stream=streams[0] if len(streams) == 1 else None,
        )
        return value

    async def goodbye(self, consumer: str) -> int:
        value: int = await self._val(f"SELECT {self._s}.worker_goodbye($1)", consumer)
        return value

    async def request(self, stream: str, id: int, lease: UUID, kind: str, request: JSON) -> int | None:
        """Ask the call's client a question (``worker_request``); its number, or None when the lease was lost."""
        value: int | None = await self._val(
            f"SELECT {self._s}.worker_request($1, $2, $3, $4, $5)", stream, id, lease, kind, request, stream=stream
        )
        return value

    async def request_answer(self, stream: str, id: int, lease: UUID, seq: int) -> JSON:
        """The answer to question ``seq`` (``worker_request_answer``); None while it is pending."""
        return await self._val(
            f"SELECT {self._s}.worker_request_answer($1, $2, $3, $4)", stream, id, lease, seq, stream=stream
        )

    async def alive(self, consumer: str, ttl_ms: int, streams: list[str], workflows: list[list[str]] | None) -> int:
        """One heartbeat for many streams, each with the workflow names served on it (``worker_alive``)."""
        value: int = await self._val(
            f"SELECT {self._s}.worker_alive($1, $2, $3, $4)", consumer, ttl_ms, streams, workflows,
            stream=streams[0] if len(streams) == 1 else None,
        )
        return value

    async def park(self, consumer: str, streams: list[str], park: bool, capacity: int) -> bool:
        """Stop listening (``park``) or listen again, for all of ``streams``, running ``capacity`` handlers at
        once: whether the process is parked now (``worker_park`` refuses to park a process that is needed)."""
        value: bool = await self._val(f"SELECT {self._s}.worker_park($1, $2, $3, $4)", consumer, streams, park,
                                      capacity, stream=streams[0] if len(streams) == 1 else None)
        return value

    async def pending(self, streams: list[str]) -> list[str]:
        """Which of ``streams`` have work now: a due ready message or an expired lease (``worker_pending``)."""
        rows = await self._rows(f"SELECT * FROM {self._s}.worker_pending($1)", streams,
                                stream=streams[0] if len(streams) == 1 else None)
        return [r[0] for r in rows]


class CallerAPI(_API):
    """The caller_* functions, as a caller role (a gateway) calls them."""

    kind = "caller"

    async def stats(self) -> list[QueueStats]:
        """Per stream of this role's allow-list: what waits, runs, retries, died (``caller_stats()``)."""
        rows = await self._rows(f"SELECT * FROM {self._s}.caller_stats()")
        return [QueueStats(r["stream"], r["ready"], r["in_flight"], r["retrying"], r["dead"],
                           r["oldest_ready_seconds"]) for r in rows]

    async def tools(self) -> list[ToolRecord]:
        try:
            rows = await self._rows(f"SELECT * FROM {self._s}.caller_tool_definitions()")
        except SchemaOutdated:  # a schema an earlier version made (a rolling upgrade): no metadata there
            rows = await self._rows(f"SELECT * FROM {self._s}.caller_tools()")
        return [ToolRecord(r["stream"], r["workflow_name"], r["name"], r["description"], r["input_schema"],
                           r["output_schema"], r["live_workers"], *(r.get(k) for k in METADATA)) for r in rows]

    async def call(
        self, stream: str, workflow_name: str, args: JSON, timeout_ms: int, idempotency_key: str | None = None
    ) -> UUID:
        value: UUID = await self._val(
            f"SELECT {self._s}.caller_call($1, $2, $3, $4, $5)",
            stream, workflow_name, args, timeout_ms, idempotency_key, stream=stream,
        )
        return value

    async def call_many(self, calls: list[tuple[str, str, JSON, int]]) -> list[UUID]:
        """Several calls ``(stream, workflow_name, args, timeout_ms)`` in one statement and one commit
        (``caller_call_many``); their ids, in order. One refused call refuses them all."""
        value: list[UUID] = await self._val(
            f"SELECT {self._s}.caller_call_many($1, $2, $3, $4)",
            [c[0] for c in calls], [c[1] for c in calls], [c[2] for c in calls], [c[3] for c in calls],
            stream=calls[0][0] if len({c[0] for c in calls}) == 1 else None,
        )
        return value

    async def results(self, call_ids: list[UUID]) -> dict[UUID, CallResult]:
        """The state of several of this role's calls (``caller_results``); calls not found are left out."""
        rows = await self._rows(f"SELECT * FROM {self._s}.caller_results($1)", call_ids)
        return {r["call_id"]: _call_result(r) for r in rows}

    async def result(self, call_id: UUID) -> CallResult:
        rows = await self._rows(f"SELECT * FROM {self._s}.caller_result($1)", call_id)
        return _call_result(rows[0])

    async def cancel(self, call_id: UUID) -> str:
        value: str = await self._val(f"SELECT {self._s}.caller_cancel($1)", call_id)
        return value

    async def request(self, call_id: UUID) -> Question | None:
        """The pending question of one of this role's running calls (``caller_request``), if there is one."""
        rows = await self._rows(f"SELECT * FROM {self._s}.caller_request($1)", call_id)
        return Question(call_id, rows[0]["seq"], rows[0]["kind"], rows[0]["request"], rows[0]["deadline"]) if rows \
            else None

    async def requests(self, call_ids: list[UUID]) -> list[UUID]:
        """Which of several of this role's running calls have a pending question (``caller_requests``)."""
        rows = await self._rows(f"SELECT * FROM {self._s}.caller_requests($1)", call_ids)
        return [r["call_id"] for r in rows]

    async def answer(self, call_id: UUID, seq: int, response: JSON) -> bool:
        """Answer question ``seq`` of one of this role's running calls (``caller_answer``)."""
        return bool(await self._val(f"SELECT {self._s}.caller_answer($1, $2, $3)", call_id, seq, response))

    async def call_durable(self, stream: str, workflow_name: str, args: JSON, timeout_ms: int) -> UUID:
        """``caller_call``, committed durably before the id is returned (``caller_call_durable``): for a call
        whose id is handed to a client as a task."""
        value: UUID = await self._val(f"SELECT {self._s}.caller_call_durable($1, $2, $3, $4)",
                                      stream, workflow_name, args, timeout_ms, stream=stream)
        return value

    async def status(self, call_id: UUID) -> CallStatus | None:
        """One of this role's calls as ``caller_call_status`` shows it; None for another role's call or none."""
        rows = await self._rows(f"SELECT * FROM {self._s}.caller_call_status($1)", call_id)
        if not rows:
            return None
        r = rows[0]
        return CallStatus(r["state"], r["result"], r["is_error"], r["error"], r["progress"], r["progress_total"],
                          r["progress_message"], r["created_at"], r["started_at"], r["finished_at"], r["deadline"],
                          r["ahead"])
