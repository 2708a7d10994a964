"""The audit trail of a gateway serving identities: one structured log line per call, and the same facts in
``<schema>.audit`` for ``audit_retention_ms`` (``mcp-hotmesh audit``).

The line goes to the ``mcp_hotmesh.audit`` logger at once (with ``--log-format json`` its fields are JSON keys).
The rows are written in batches, each through ``caller_audit()`` as the caller role that made the calls, a
moment after the calls end (``FLUSH_INTERVAL``): the database records the writer's role itself, and a call's
latency carries no audit write. Argument values are never recorded unless the configuration says so
(``[audit] arguments = true``); sizes are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from ._config import check_schema
from ._postgres import JsonText, translated
from .errors import HotMeshError

log = logging.getLogger("mcp_hotmesh.audit")

FLUSH_INTERVAL = 0.5
"""Seconds between two batches of audit rows."""
MAX_BATCH = 500
MAX_PENDING = 100_000
"""Rows held while the database cannot take them; past this the oldest are dropped (and said so)."""


@dataclass(frozen=True)
class AuditRecord:
    at: datetime
    identity: str
    role: str
    tool: str
    call_id: UUID | None
    outcome: str
    duration_ms: float
    args_bytes: int
    result_bytes: int
    arguments: Any = None  # only with [audit] arguments = true

    def as_json(self) -> dict[str, Any]:
        data = {"at": self.at.isoformat(), "identity": self.identity, "role": self.role, "tool": self.tool,
                "call_id": str(self.call_id) if self.call_id else None, "outcome": self.outcome,
                "duration_ms": round(self.duration_ms, 3), "args_bytes": self.args_bytes,
                "result_bytes": self.result_bytes}
        if self.arguments is not None:
            data["arguments"] = self.arguments
        return data


class AuditTrail:
    """Logs each call at once and keeps its row until the next batch for its caller role."""

    def __init__(self, schema: str, pool_of: Callable[[str], asyncpg.Pool | None]) -> None:
        self.schema = check_schema(schema)
        self._pool_of = pool_of
        self._pending: dict[str, list[AuditRecord]] = {}
        self.written = 0

    def record(self, entry: AuditRecord) -> None:
        data = entry.as_json()
        log.info("audit %s as %s: %s %s in %.0f ms", entry.identity, entry.role, entry.tool, entry.outcome,
                 entry.duration_ms, extra={"audit": True, **{k: v for k, v in data.items() if k != "arguments"}})
        rows = self._pending.setdefault(entry.role, [])
        rows.append(entry)
        if len(rows) > MAX_PENDING:
            del rows[: len(rows) - MAX_PENDING]
            log.warning("audit rows of role %s dropped: the database has not taken them for a while", entry.role)

    async def run(self) -> None:
        while True:
            await anyio.sleep(FLUSH_INTERVAL)
            for role in list(self._pending):
                await self.flush(role)

    async def flush(self, role: str, pool: asyncpg.Pool | None = None) -> None:
        """Write ``role``'s pending rows through its pool (``pool``, or the one ``pool_of`` gives)."""
        pool = pool or self._pool_of(role)
        while self._pending.get(role):
            if pool is None:
                return  # written when the role's pool is up again
            rows = self._pending[role][:MAX_BATCH]
            try:
                with translated():
                    await pool.fetchval(f'SELECT "{self.schema}".caller_audit($1::jsonb)',
                                        JsonText(json.dumps([r.as_json() for r in rows])))
            except (HotMeshError, OSError, asyncpg.InterfaceError) as exc:
                log.warning("could not write %d audit row(s) of role %s: %s", len(rows), role, exc)
                return
            del self._pending[role][: len(rows)]
            self.written += len(rows)
        self._pending.pop(role, None)


async def query(conn: asyncpg.Connection, *, schema: str = "hotmesh", identity: str | None = None,
                tool: str | None = None, since: timedelta | None = None, limit: int = 100) -> list[AuditRecord]:
    """The audit rows, newest last (the admin's connection)."""
    schema = check_schema(schema)
    since_at = datetime.now(UTC) - since if since is not None else None
    with translated():
        rows = await conn.fetch(
            "SELECT * FROM (SELECT at, identity, role_name, tool, call_id, outcome, duration_ms, args_bytes, "
            f'result_bytes, arguments FROM "{schema}".audit '
            "WHERE ($1::text IS NULL OR identity = $1) AND ($2::text IS NULL OR tool = $2) "
            "AND ($3::timestamptz IS NULL OR at >= $3) ORDER BY at DESC, id DESC LIMIT $4) AS newest ORDER BY at",
            identity, tool, since_at, limit)
    return [AuditRecord(r["at"], r["identity"], r["role_name"], r["tool"], r["call_id"], r["outcome"],
                        r["duration_ms"], r["args_bytes"], r["result_bytes"],
                        json.loads(r["arguments"]) if r["arguments"] is not None else None) for r in rows]
