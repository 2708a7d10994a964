"""Tool definitions an admin approves, and tool names a stream owns (``mcp-hotmesh tools``).

A worker's registration that differs from the approved definition waits (``tool_pending``) and agents keep the
approved one, until the admin approves it here, unless the setting ``approve_tools`` is 0. A tool name, once
live, belongs to its stream (``tool_names``), also after the tool is removed, until the admin releases it.
``serve`` started as the admin approves the definitions of the tool set it runs itself (``approve_toolset``):
the admin chose that code. Every function here runs over the admin's connection and calls the owner-only
helpers of ``sql/functions.sql`` ("tool definitions").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ._config import check_schema
from ._postgres import translated
from ._tools import ToolSet
from .errors import ConfigError, NotFound


@dataclass(frozen=True)
class ToolDefinition:
    """One tool as ``mcp-hotmesh tools`` shows it (the JSON keys are these names).

    ``state``: ``approved`` (live), ``changed`` (live, and another definition waits for approval) or ``pending``
    (nothing live yet: agents do not see the tool)."""

    name: str
    stream: str
    workflow_name: str
    state: str
    registered_by: str
    live_workers: int
    updated_at: datetime
    approved_by: str | None
    approved: dict[str, Any] | None  # the definition agents see
    pending: dict[str, Any] | None  # the one that waits

    @property
    def changes(self) -> list[str]:
        """The keys of the definition that the pending one changes (all of them for a first registration)."""
        if self.pending is None:
            return []
        before = self.approved or {}
        return sorted(k for k in {*before, *self.pending} if before.get(k) != self.pending.get(k))

    def as_json(self, *, full: bool = False) -> dict[str, Any]:
        data = {**asdict(self), "updated_at": self.updated_at.isoformat(), "changes": self.changes}
        if not full:
            del data["approved"], data["pending"]
        return data


async def definitions(conn: asyncpg.Connection, schema: str) -> list[ToolDefinition]:
    """Every tool, live or waiting for approval, by name (admin connection)."""
    s = check_schema(schema)
    with translated():
        rows = await conn.fetch(
            f"""SELECT coalesce(p.name, t.name) AS name, coalesce(t.stream, p.stream) AS stream,
                       coalesce(t.workflow_name, p.workflow_name) AS workflow_name,
                       coalesce(p.registered_by, t.registered_by) AS registered_by,
                       coalesce(p.registered_at, t.updated_at) AS updated_at, t.approved_by,
                       "{s}"._tool_approved(coalesce(t.stream, p.stream), coalesce(t.workflow_name, p.workflow_name))
                           AS approved,
                       p.definition AS pending, t.name IS NULL AS first,
                       (SELECT count(*) FROM "{s}".workers w
                        WHERE w.stream = coalesce(t.stream, p.stream) AND w.expires_at > now()) AS live
                FROM "{s}".tools t
                FULL JOIN "{s}".tool_pending p ON p.stream = t.stream AND p.workflow_name = t.workflow_name
                ORDER BY 1, 2""")
    return [
        ToolDefinition(
            name=r["name"], stream=r["stream"], workflow_name=r["workflow_name"],
            state="pending" if r["first"] else "changed" if r["pending"] is not None else "approved",
            registered_by=r["registered_by"], live_workers=r["live"], updated_at=r["updated_at"],
            approved_by=r["approved_by"], approved=_json(r["approved"]), pending=_json(r["pending"]),
        )
        for r in rows
    ]


def _json(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return dict(json.loads(value)) if isinstance(value, str) else dict(value)


async def find(conn: asyncpg.Connection, schema: str, name: str, stream: str | None = None) -> ToolDefinition:
    """The tool named ``name`` (its live or its pending name); ``stream`` when several streams register it."""
    found = [d for d in await definitions(conn, schema)
             if name in (d.name, (d.approved or {}).get("name")) and stream in (None, d.stream)]
    if not found:
        raise NotFound(f"no registered tool named {name!r}" + (f" on stream {stream!r}" if stream else ""))
    if len(found) > 1:
        raise ConfigError(f"several streams register a tool named {name!r} ({', '.join(d.stream for d in found)}): "
                          "say which with --stream")
    return found[0]


async def approve(conn: asyncpg.Connection, schema: str, name: str, stream: str | None = None) -> ToolDefinition:
    """Make the definition that waits for ``name`` the one agents see; its name then belongs to its stream."""
    s = check_schema(schema)
    tool = await find(conn, s, name, stream)
    if tool.pending is None:
        raise NotFound(f"tool {name!r} has no definition waiting for approval")
    with translated():
        await conn.fetchval(f'SELECT "{s}"._tool_approve($1, $2)', tool.stream, tool.workflow_name)
    return tool


async def approve_all(conn: asyncpg.Connection, schema: str) -> list[ToolDefinition]:
    """Approve every definition that waits (in one transaction: all or none)."""
    s = check_schema(schema)
    waiting = [d for d in await definitions(conn, s) if d.pending is not None]
    with translated():
        async with conn.transaction():
            for tool in waiting:
                await conn.fetchval(f'SELECT "{s}"._tool_approve($1, $2)', tool.stream, tool.workflow_name)
    return waiting


async def approve_toolset(conn: asyncpg.Connection, schema: str, toolset: ToolSet) -> None:
    """The admin approves the definitions of a tool set it runs itself (``serve``'s attached worker), so that its
    worker's registrations change nothing. A name another stream owns is refused here, before anything runs."""
    s = check_schema(schema)
    with translated():
        async with conn.transaction():
            for tool in toolset.tools:
                await conn.fetchval(f'SELECT "{s}"._tool_approve($1, $2, $3::text::jsonb)', tool.topic,
                                    tool.workflow_name, json.dumps(tool.registration()))


async def remove(conn: asyncpg.Connection, schema: str, name: str, stream: str | None = None, *,
                 release: bool = False) -> ToolDefinition | None:
    """Take a tool out of the catalog, approved and pending (a tool nobody serves any more); gateways stop listing it
    at once. Its name stays its stream's unless ``release``: then any stream may register it again. Returns the
    tool removed (None when only a reserved name was released)."""
    s = check_schema(schema)
    try:
        tool: ToolDefinition | None = await find(conn, s, name, stream)
    except NotFound:
        if not release:
            raise
        tool = None
    with translated():
        async with conn.transaction():
            if tool is not None:
                await conn.execute(f'DELETE FROM "{s}".tools WHERE stream = $1 AND workflow_name = $2',
                                   tool.stream, tool.workflow_name)
                await conn.execute(f'DELETE FROM "{s}".tool_pending WHERE stream = $1 AND workflow_name = $2',
                                   tool.stream, tool.workflow_name)
            if release:
                released = await conn.fetchval(
                    f"""DELETE FROM "{s}".tool_names WHERE folded = lower(replace($1, '-', '_'))
                        AND ($2::text IS NULL OR stream = $2) RETURNING name""", name, stream)
                if released is None and tool is None:
                    raise NotFound(f"no registered tool or reserved name {name!r}")
            await conn.execute("SELECT pg_notify($1, '')", f"{s}_tools")
    return tool


