"""Operations: what an operator sees (``status``), fixes (``dlq``) and what keeps the tables small (retention).

``status`` and the ``dlq`` functions run over the admin's connection and call the admin-only helpers of
``sql/002_operations.sql``. Retention runs in every gateway and worker process: ``retention_loop`` calls
``caller_purge()`` or ``worker_purge()`` now and then, each of which deletes a bounded batch of the finished calls
of that role's own streams, under a row lock that no scoped role can take. ``queue_stats`` is what a gateway's
``/metrics`` reports about its queues (``caller_stats()``).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import anyio
import anyio.lowlevel
import asyncpg

from .config import check_schema, check_stream
from .errors import ConfigError, HotMeshError
from .postgres import is_transient, translated

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1h30m``, ``500ms``: a duration (bare numbers are seconds)."""
    compact = text.strip().lower().replace(" ", "")
    total = 0.0
    pos = 0
    for match in _DURATION.finditer(compact):
        if match.start() != pos or not match.group(0):
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact):
        raise ConfigError(f"invalid duration {text!r}: use e.g. 30s, 15m, 2h, 7d or 1h30m")
    return timedelta(seconds=total)


def _seconds(value: timedelta | None) -> str:
    return "-" if value is None else format_age(value.total_seconds())


def format_age(seconds: float | None) -> str:
    """``-``, ``400ms``, ``1.4s``, ``12s``, ``3m05s``, ``2h10m``, ``3d4h``: short and readable in a table."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows)


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

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "time": self.time.isoformat(),
            "streams": [asdict(s) for s in self.streams],
            "roles": [asdict(r) for r in self.roles],
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
    )


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def format_status(st: Status) -> str:
    """The status as a terminal table, with a line saying what needs a look."""
    header = ("STREAM", "TOOLS", "READY", "IN FLIGHT", "STALLED", "RETRYING", "DEAD", "OLDEST WAITING", "WORKERS",
              "CALLS/S")
    rows = [header] + [
        (s.stream, ",".join(s.tools) or "-", str(s.ready), str(s.in_flight), str(s.stalled), str(s.retrying),
         str(s.dead), format_age(s.oldest_waiting_seconds), str(s.live_workers), f"{s.calls_per_second:.2f}")
        for s in st.streams
    ]
    out = f"schema {st.schema} at {st.time.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC\n"
    out += _table(rows) if st.streams else "no streams yet: no tools registered, no messages, no workers\n"
    kept = format_age(st.retention_seconds)
    dead = "kept until purged" if st.dead_retention_seconds is None else f"kept {format_age(st.dead_retention_seconds)}"
    last = "never" if st.last_purge is None else f"{st.last_purge:%Y-%m-%d %H:%M:%S} UTC"
    out += f"retention: done calls kept {kept}, dead calls {dead}; last purge {last}\n"
    if st.roles:
        out += "\n" + _table([("ROLE", "KIND", "LOGIN", "SESSIONS", "OLDEST TRANSACTION", "QUEUED", "QUEUED BYTES")] + [
            (r.role, r.kind, "yes" if r.can_login else "no",
             f"{r.sessions}/{r.connection_limit}" if r.connection_limit >= 0 else str(r.sessions),
             format_age(r.oldest_transaction_seconds), str(r.queued), str(r.queued_bytes))
            for r in st.roles
        ])
    notes = []
    for s in st.streams:
        if (s.ready or s.stalled) and not s.live_workers:
            notes.append(f"{s.stream}: {s.ready + s.stalled} message(s) waiting and no live worker")
        if s.stalled:
            notes.append(f"{s.stream}: {s.stalled} message(s) held by a worker that stopped responding "
                         "(reclaimed at the next claim)")
        if s.dead:
            notes.append(f"{s.stream}: {s.dead} dead message(s): mcp-hotmesh dlq list --stream {s.stream}")
    out += "".join(f"! {n}\n" for n in notes)
    return out


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
        raise ConfigError(f"no dead message with id {id}")
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


def format_dlq(messages: list[DeadMessage], now: datetime) -> str:
    if not messages:
        return "the dead-letter queue is empty (for these filters)\n"
    rows = [("ID", "STREAM", "WORKFLOW", "CALL", "ATTEMPTS", "RECLAIMS", "DIED", "ERROR")]
    for m in messages:
        error = (m.error or "").replace("\n", " ")
        rows.append((str(m.id), m.stream, m.workflow_name or "-", str(m.call_id)[:8] if m.call_id else "-",
                     str(m.attempt), str(m.reclaims),
                     f"{format_age((now - m.died_at).total_seconds())} ago" if m.died_at else "-",
                     error if len(error) <= 80 else error[:77] + "..."))
    return _table(rows)


def format_dead(m: DeadMessage) -> str:
    lines = [f"{key}: {value}" for key, value in m.as_json().items()]
    lines.append("args: " + json.dumps(m.args, ensure_ascii=False, indent=2))
    if m.result is not None:
        lines.append("result: " + json.dumps(m.result, ensure_ascii=False, indent=2))
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- settings

INTERNAL_SETTINGS = {"purge_lock"}


async def settings(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    """The admin's settings (lease bounds, size limits, retention), by key."""
    s = check_schema(schema)
    with translated():
        rows = await conn.fetch(f'SELECT key, value FROM "{s}".settings ORDER BY key')
    return {r["key"]: r["value"] for r in rows if r["key"] not in INTERNAL_SETTINGS}


def parse_setting(key: str, text: str) -> int:
    """A setting's new value: a whole number; for the ``*_ms`` keys a duration too (``2h``, ``30s``)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if key.endswith("_ms"):
        return int(parse_duration(text).total_seconds() * 1000)
    raise ConfigError(f"{key} must be a whole number, not {text!r}")


async def change_settings(conn: asyncpg.Connection, schema: str, changes: dict[str, int]) -> dict[str, int]:
    """Set existing settings (all or none); returns the settings after the change."""
    s = check_schema(schema)
    known = await settings(conn, s)
    for key, value in changes.items():
        if key not in known:
            raise ConfigError(f"no setting {key!r}; the settings are: {', '.join(sorted(known))}")
        if value < 0 or value > 2**62:
            raise ConfigError(f"{key} must be between 0 and 2^62")
    merged = {**known, **changes}
    if merged.get("min_lease_ms", 0) > merged.get("max_lease_ms", 2**62):
        raise ConfigError("min_lease_ms must not be larger than max_lease_ms")
    with translated():
        async with conn.transaction():
            for key, value in changes.items():
                await conn.execute(f'UPDATE "{s}".settings SET value = $2 WHERE key = $1', key, value)
    return await settings(conn, s)


# ------------------------------------------------------------------------------------------- retention

Kind = Literal["worker", "caller"]


async def purge(pool: asyncpg.Pool | asyncpg.Connection, schema: str, kind: Kind) -> int:
    """One bounded purge of the finished calls of this role's streams (``<kind>_purge()``): how many rows were
    deleted, or -1 when another process was purging at that moment."""
    s = check_schema(schema)
    function = {"worker": "worker_purge", "caller": "caller_purge"}[kind]
    with translated():
        count: int = await pool.fetchval(f'SELECT "{s}".{function}()')
    return count


async def retention_loop(
    pool: asyncpg.Pool, schema: str, kind: Kind, *, interval: float = 60.0, max_rounds: int = 20
) -> None:
    """Purge every ``interval`` seconds (with jitter, so processes started together spread out), until
    cancelled. A full batch means more is waiting: go on at once, ``max_rounds`` batches at most per turn."""
    if interval <= 0:
        return
    failures = 0
    await anyio.sleep(random.uniform(0, min(interval, 10.0)))
    while True:
        try:
            total = 0
            for _ in range(max_rounds):
                count = await purge(pool, schema, kind)
                if count <= 0:
                    break
                total += count
                await anyio.lowlevel.checkpoint()
            if total:
                log.info("retention: purged %d finished call(s)", total)
            failures = 0
        except HotMeshError as exc:
            failures += 1
            level = logging.DEBUG if is_transient(exc) and failures > 1 else logging.WARNING
            log.log(level, "retention: purge failed: %s", exc)
        await anyio.sleep(interval * random.uniform(0.8, 1.2))


# -------------------------------------------------------------------------------------------- watchdog

WATCHDOG_INTERVAL = 3.0
"""How often a gateway or worker process runs the watchdog. A session that holds a transaction open on purpose
is ended within the schema's ``watchdog_idle_ms`` (5 s) plus this."""


@dataclass(frozen=True)
class EndedSession:
    role: str
    pid: int
    reason: str  # idle in a transaction, a transaction open too long, an advisory lock held
    seconds: float  # how long its transaction had been open (0: none)


async def watchdog(pool: asyncpg.Pool | asyncpg.Connection, schema: str, kind: Kind) -> list[EndedSession]:
    """End the scoped sessions whose transaction sat idle or stayed open too long (``<kind>_watchdog()``)."""
    s = check_schema(schema)
    function = {"worker": "worker_watchdog", "caller": "caller_watchdog"}[kind]
    with translated():
        rows = await pool.fetch(f'SELECT * FROM "{s}".{function}()')
    return [EndedSession(r["role_name"], r["pid"], r["reason"], r["seconds"]) for r in rows]


async def watchdog_loop(
    pool: asyncpg.Pool, schema: str, kind: Kind, *, interval: float = WATCHDOG_INTERVAL
) -> None:
    """Run the watchdog every ``interval`` seconds until cancelled; one log line per session it ends."""
    failures = 0
    while True:
        await anyio.sleep(interval * random.uniform(0.8, 1.2))
        try:
            for ended in await watchdog(pool, schema, kind):
                log.warning("watchdog: ended session %d of role %s: %s (transaction open %.1fs)",
                            ended.pid, ended.role, ended.reason, ended.seconds)
            failures = 0
        except HotMeshError as exc:
            failures += 1
            level = logging.DEBUG if is_transient(exc) and failures > 1 else logging.WARNING
            log.log(level, "watchdog: %s", exc)


# -------------------------------------------------------------------------------------- queue statistics

@dataclass(frozen=True)
class QueueStats:
    stream: str
    ready: int
    in_flight: int
    retrying: int
    dead: int
    oldest_ready_seconds: float | None


async def queue_stats(pool: asyncpg.Pool, schema: str) -> list[QueueStats]:
    """Per stream of the caller role's allow-list: what waits, runs, retries, died (``caller_stats()``)."""
    s = check_schema(schema)
    with translated():
        rows = await pool.fetch(f'SELECT * FROM "{s}".caller_stats()')
    return [QueueStats(r["stream"], r["ready"], r["in_flight"], r["retrying"], r["dead"], r["oldest_ready_seconds"])
            for r in rows]
