"""Apply the SQL contract in ``sql/``: the bootstrap, then each numbered migration once, in order.

The files name the schema ``hotmesh`` (and its roles ``hotmesh_owner``, ``hotmesh_worker``,
``hotmesh_caller``); ``render`` writes the chosen schema name in its place. The schema name is checked against
``^[a-z_][a-z0-9_]{0,39}$`` first, so what is written is always a plain identifier. Everything runs under an
advisory lock, so concurrent starts migrate once; numbered migrations run as the owner role, so the owner
owns every object.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass

import asyncpg

from ._config import check_schema
from ._postgres import check_server_version, translated
from ._roles import adopt_all
from .errors import DatabaseError

LOCK_TIMEOUT = "3s"
_WORD = re.compile(r"\bhotmesh(?=[._\"' ;,)]|_owner|_worker|_caller|_w_|_r_|_tools|$)", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _read(name: str) -> str:
    return importlib.resources.files("mcp_hotmesh.sql").joinpath(name).read_text(encoding="utf-8")


def migrations() -> list[Migration]:
    """The numbered migrations shipped with the package, in order."""
    found = []
    for entry in importlib.resources.files("mcp_hotmesh.sql").iterdir():
        match = re.match(r"^(\d{3})_([a-z0-9_]+)\.sql$", entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def render(sql: str, schema: str) -> str:
    """The SQL with the schema name (and the role names derived from it) written in."""
    check_schema(schema)
    return _WORD.sub(schema, sql)


def full_sql(schema: str) -> str:
    """Everything ``migrate`` would run, for a DBA to read (``mcp-hotmesh sql``)."""
    parts = [render(_read("bootstrap.sql"), schema)]
    parts += [f"-- migration {m.version:03d}_{m.name}\nSET ROLE {schema}_owner;\n{render(m.sql, schema)}\nRESET ROLE;"
              for m in migrations()]
    return "\n\n".join(parts)


async def migrate(conn: asyncpg.Connection, schema: str, *, lock_timeout: str = LOCK_TIMEOUT) -> list[int]:
    """Bring ``schema`` up to date; returns the versions applied now. ``conn`` must be the admin's.

    Concurrent runs are serialised by ``LOCK TABLE <schema>.migrations``, a lock only the admin and the owner
    can take (an advisory lock would not do: any role can take any advisory lock, and so stall every start).
    Every lock is waited for ``lock_timeout`` at most (a PostgreSQL duration, ``LOCK_TIMEOUT`` unless given): a
    role with USAGE on the schema can hold a table's lock while its own statement is planned, and a migration
    must then fail clearly rather than wait for ever (and hold up, meanwhile, every statement queued behind its
    own lock request).
    """
    check_schema(schema)
    with translated():
        await check_server_version(conn)
        if await is_migrated(conn, schema):
            return []
        try:
            return await _apply(conn, schema, lock_timeout)
        except asyncpg.LockNotAvailableError:
            holders = await conn.fetch(
                "SELECT DISTINCT a.pid, a.usename FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "JOIN pg_class c ON c.oid = l.relation WHERE c.relnamespace = $1::regnamespace "
                "AND l.granted AND a.pid <> pg_backend_pid()",
                schema,
            )
            who = ", ".join(f"{r['usename']} (pid {r['pid']})" for r in holders) or "another session"
            raise DatabaseError(
                f"migrating schema {schema} gave up after {lock_timeout}: its tables are locked by {who}; end "
                "that session (mcp-hotmesh revoke ROLE, or pg_terminate_backend) and run it again"
            ) from None


async def _apply(conn: asyncpg.Connection, schema: str, lock_timeout: str) -> list[int]:
    await _bootstrap(conn, schema, lock_timeout)
    done = []
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
        await conn.execute(f'LOCK TABLE "{schema}".migrations IN SHARE ROW EXCLUSIVE MODE')
        applied = {r["version"] for r in await conn.fetch(f'SELECT version FROM "{schema}".migrations')}
        for m in migrations():
            if m.version in applied:
                continue
            await conn.execute(f'SET LOCAL ROLE "{schema}_owner"')
            await conn.execute(render(m.sql, schema))
            await conn.execute("RESET ROLE")
            await conn.execute(
                f'INSERT INTO "{schema}".migrations (version, name) VALUES ($1, $2)', m.version, m.name
            )
            done.append(m.version)
        if 3 in done:  # the watchdog (003) sees a role's sessions through the owner's membership in it
            await adopt_all(conn, schema)
    return done


async def _bootstrap(conn: asyncpg.Connection, schema: str, lock_timeout: str) -> None:
    """Run the idempotent bootstrap; a concurrent first run may win a race for a role or the schema: retry."""
    for attempt in range(5):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
                await conn.execute(render(_read("bootstrap.sql"), schema))
            return
        except (asyncpg.UniqueViolationError, asyncpg.DuplicateObjectError, asyncpg.InternalServerError):
            # duplicate role or schema, or "tuple concurrently updated" on a GRANT: another migrate got there first
            if attempt == 4:
                raise


async def is_migrated(conn: asyncpg.Connection, schema: str) -> bool:
    """Whether every shipped migration is recorded in ``schema``."""
    with translated():
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".migrations')
        if not exists:
            return False
        applied = {r["version"] for r in await conn.fetch(f'SELECT version FROM "{schema}".migrations')}
    return {m.version for m in migrations()} <= applied
