"""Admin queries: what an operator sees (``status``), fixes (``dlq``) and tunes (``settings``).

Each runs over the admin's connection and calls the admin-only helpers of ``sql/functions.sql`` (``_ops_*``,
``_dlq_*``; never executable by a scoped role). The CLI prints what they return (``_format``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from ._config import check_schema, check_stream
from ._postgres import translated
from .errors import ConfigError, NotFound

# ---------------------------------------------------------------------------------------------- status

@dataclass(frozen=True)
class StreamStatus:
    """One stream, as ``mcp-hotmesh status`` shows it (the JSON keys are these names)."""

    stream: str
    tools: list[str]
    ready: int  # waiting to be claimed now
    in_flight: int  # claimed, the lease held
    stalled: int  # claimed, the lease expired: its worker is gone; reclaimed at the next claim
    retrying: int  # waiting out a retry's backoff
    dead: int  # in the dead-letter queue
    done: int  # answered, kept until retention purges them
    oldest_waiting_seconds: float | None  # how long the oldest ready message has waited to be claimed
    live_workers: int
    calls_per_second: float  # calls that ended (done or dead) over the last minute


@dataclass(frozen=True)
class RoleStatus:
    """One scoped role, as ``mcp-hotmesh status`` shows it: what it holds of the server."""

    role: str
    kind: str
    can_login: bool
    connection_limit: int  # -1: none
    sessions: int
    oldest_transaction_seconds: float | None  # its oldest open transaction (the watchdog ends long ones)
    queued: int  # calls it made that wait to be claimed
    queued_bytes: int


@dataclass(frozen=True)
class Status:
    schema: str
    time: datetime
    streams: list[StreamStatus]
    retention_seconds: float
    dead_retention_seconds: float | None  # None: dead calls are kept until purged by hand
    last_purge: datetime | None
    roles: list[RoleStatus]
    pending_tools: list[str] = field(default_factory=list)  # tools whose definitions wait for an admin's approval

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "time": self.time.isoformat(),
            "streams": [asdict(s) for s in self.streams],
            "roles": [asdict(r) for r in self.roles],
            "pending_tools": self.pending_tools,
            "totals": {key: sum(getattr(s, key) for s in self.streams)
                       for key in ("ready", "in_flight", "stalled", "retrying", "dead", "done", "live_workers")},
            "retention": {
                "done_seconds": self.retention_seconds,
                "dead_seconds": self.dead_retention_seconds,
                "last_purge": self.last_purge.isoformat() if self.last_purge else None,
            },
        }


async def status(conn: asyncpg.Connection, schema: str) -> Status:
    """Every stream with messages, tools or live workers (admin connection)."""
    s = check_schema(schema)
    with translated():
        rows = await conn.fetch(f'SELECT * FROM "{s}"._ops_status()')
        settings = {r["key"]: r["value"] for r in await conn.fetch(
            f"SELECT key, value FROM \"{s}\".settings WHERE key IN "
            "('retention_ms', 'dead_retention_ms', 'purge_lock')")}
        now = await conn.fetchval("SELECT now()")
        role_rows = await conn.fetch(f'SELECT * FROM "{s}"._ops_roles()')
        pending = [r["name"] for r in await conn.fetch(f'SELECT name FROM "{s}".tool_pending ORDER BY name')]
    streams = [
        StreamStatus(
            stream=r["stream"], tools=list(r["tools"]), ready=r["ready"], in_flight=r["in_flight"],
            stalled=r["stalled"], retrying=r["retrying"], dead=r["dead"], done=r["done"],
            oldest_waiting_seconds=_rounded(r["oldest_ready_seconds"]),
            live_workers=r["live_workers"], calls_per_second=round(r["finished_last_minute"] / 60, 3),
        )
        for r in rows
    ]
    last = settings.get("purge_lock") or 0
    dead_ms = settings.get("dead_retention_ms") or 0
    return Status(
        schema=s, time=now, streams=streams, retention_seconds=(settings.get("retention_ms") or 0) / 1000,
        dead_retention_seconds=dead_ms / 1000 if dead_ms > 0 else None,
        last_purge=datetime.fromtimestamp(last, UTC) if last else None,
        roles=[RoleStatus(r["role_name"], r["kind"], r["can_login"], r["connection_limit"], r["sessions"],
                          _rounded(r["oldest_transaction_seconds"]), r["queued"], r["queued_bytes"])
               for r in role_rows],
        pending_tools=pending,
    )


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)



# ------------------------------------------------------------------------------------------------- dlq

@dataclass(frozen=True)
class DeadMessage:
    id: int
    stream: str
    workflow_name: str
    call_id: UUID | None
    owner: str | None
    attempt: int
    reclaims: int
    error: str | None
    created_at: datetime
    died_at: datetime | None
    deadline: datetime | None
    args: Any
    result: Any

    def as_json(self, *, full: bool = False) -> dict[str, Any]:
        value: dict[str, Any] = {
            "id": self.id, "stream": self.stream, "workflow_name": self.workflow_name,
            "call_id": str(self.call_id) if self.call_id else None, "owner": self.owner,
            "attempt": self.attempt, "reclaims": self.reclaims, "error": self.error,
            "created_at": self.created_at.isoformat(), "died_at": self.died_at.isoformat() if self.died_at else None,
            "deadline": self.deadline.isoformat() if self.deadline else None,
        }
        if full:
            value["args"] = self.args
            value["result"] = self.result
        return value


@dataclass(frozen=True)
class DlqFilter:
    """Which dead messages: ids, a stream, died at least ``older_than`` ago, at most ``newer_than`` ago."""

    ids: list[int] | None = None
    stream: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.stream is not None:
            check_stream(self.stream)
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")

    @property
    def empty(self) -> bool:
        return self.ids is None and self.stream is None and self.older_than is None and self.newer_than is None

    def params(self) -> tuple[Any, ...]:
        return (self.ids, self.stream, self.older_than, self.newer_than, self.limit)


def _json(value: Any) -> Any:
    """jsonb from a connection without codecs arrives as text; anything unreadable stays text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


def _dead(r: asyncpg.Record) -> DeadMessage:
    return DeadMessage(
        id=r["id"], stream=r["stream"], workflow_name=r["workflow_name"], call_id=r["call_id"], owner=r["owner"],
        attempt=r["attempt"], reclaims=r["reclaims"], error=r["error"], created_at=r["created_at"],
        died_at=r["finished_at"], deadline=r["deadline"], args=_json(r["args"]), result=_json(r["result"]),
    )


async def dlq_list(conn: asyncpg.Connection, schema: str, where: DlqFilter) -> list[DeadMessage]:
    s = check_schema(schema)
    with translated():
        rows = await conn.fetch(f'SELECT * FROM "{s}"._dlq_list($1, $2, $3, $4, $5)', *where.params())
    return [_dead(r) for r in rows]


async def dlq_show(conn: asyncpg.Connection, schema: str, id: int) -> DeadMessage:
    found = await dlq_list(conn, schema, DlqFilter(ids=[id]))
    if not found:
        raise NotFound(f"no dead message with id {id}")
    return found[0]


@dataclass(frozen=True)
class Retried:
    id: int
    stream: str
    call_id: UUID | None
    new_id: int  # the same id when retried in place; a new one when published anew

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "stream": self.stream, "call_id": str(self.call_id) if self.call_id else None,
                "new_id": self.new_id}


async def dlq_retry(
    conn: asyncpg.Connection, schema: str, where: DlqFilter, *, deadline_in: timedelta | None = None,
    publish: bool = False,
) -> list[Retried]:
    """Queue dead messages again: a call in place, with its call_id and a fresh deadline (the time it had at
    first, or ``deadline_in`` from now); with ``publish``, as a new fire-and-forget message (the dead one is
    deleted)."""
    s = check_schema(schema)
    timeout_ms = None if deadline_in is None else int(deadline_in.total_seconds() * 1000)
    if timeout_ms is not None and timeout_ms < 1000:
        raise ConfigError("--timeout must be at least 1 second")
    with translated():
        rows = await conn.fetch(f'SELECT * FROM "{s}"._dlq_retry($1, $2, $3, $4, $5, $6, $7)',
                                *where.params(), timeout_ms, publish)
    return [Retried(r["id"], r["stream"], r["call_id"], r["new_id"]) for r in rows]


async def dlq_purge(conn: asyncpg.Connection, schema: str, where: DlqFilter) -> int:
    s = check_schema(schema)
    with translated():
        count: int = await conn.fetchval(f'SELECT "{s}"._dlq_purge($1, $2, $3, $4, $5)', *where.params())
    return count


# -------------------------------------------------------------------------------------------- settings

INTERNAL_SETTINGS = {"purge_lock"}


async def settings(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    """The admin's settings (lease bounds, size limits, retention), by key."""
    s = check_schema(schema)
    with translated():
        rows = await conn.fetch(f'SELECT key, value FROM "{s}".settings ORDER BY key')
    return {r["key"]: r["value"] for r in rows if r["key"] not in INTERNAL_SETTINGS}



SMALLEST = {
    "min_lease_ms": 1, "max_lease_ms": 1, "max_batch": 1, "max_payload_bytes": 1, "max_schema_bytes": 1,
    "max_error_chars": 1, "max_timeout_ms": 1, "max_attempts": 1, "max_worker_ttl_ms": 1000, "purge_batch": 1,
    "max_schema_depth": 1, "max_schema_nodes": 1, "max_description_chars": 1, "max_tools_per_stream": 1,
    "max_consumers_per_stream": 1, "max_json_depth": 1, "watchdog_idle_ms": 100, "watchdog_transaction_ms": 100,
    "max_tool_timeout_ms": 1, "wake_batch": 1,
}
"""The least value of a setting that still leaves the system working (0 would refuse every call, lease, ...)."""


async def change_settings(conn: asyncpg.Connection, schema: str, changes: dict[str, int]) -> dict[str, int]:
    """Set existing settings (all or none); returns the settings after the change."""
    s = check_schema(schema)
    known = await settings(conn, s)
    for key, value in changes.items():
        if key not in known:
            raise ConfigError(f"no setting {key!r}; the settings are: {', '.join(sorted(known))}")
        least = SMALLEST.get(key, 0)
        if value < least or value > 2**62:
            raise ConfigError(f"{key} must be between {least} and 2^62")
    merged = {**known, **changes}
    if merged.get("min_lease_ms", 0) > merged.get("max_lease_ms", 2**62):
        raise ConfigError("min_lease_ms must not be larger than max_lease_ms")
    with translated():
        async with conn.transaction():
            for key, value in changes.items():
                await conn.execute(f'UPDATE "{s}".settings SET value = $2 WHERE key = $1', key, value)
    return await settings(conn, s)
