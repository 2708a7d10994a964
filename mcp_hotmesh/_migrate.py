"""Apply the SQL contract in ``sql/``: the bootstrap, each numbered migration once, in order, then the function
definitions (``functions.sql``) whenever they changed.

The files name the schema ``hotmesh`` (and its roles ``hotmesh_owner``, ``hotmesh_worker``,
``hotmesh_caller``); ``render`` writes the chosen schema name in its place. The schema name is checked against
``^[a-z_][a-z0-9_]{0,39}$`` first, so what is written is always a plain identifier. Numbered migrations and the
definitions run as the owner role, so the owner owns every object.

Upgrades. A numbered migration (``NNN_name.sql``: tables, indexes, data) runs once; the sha256 of its file is
recorded beside its version in ``<schema>.migrations`` (NULL for one applied before checksums were recorded), and
once landed its file is never edited. ``functions.sql`` holds every function as a ``CREATE OR REPLACE`` and the
grants: it runs after any numbered migration, and again whenever its sha256 differs from the one recorded in
``<schema>.definitions``. So a schema left by any earlier version (whose ``001`` may have defined the functions
differently) ends with the functions this version needs. ``migrate`` refuses, with a message that says so, a
schema that records a migration with another checksum than the file shipped here (a landed file was edited, or an
unreleased build migrated it) or a version this package does not ship (a newer mcp-hotmesh migrated it: its
functions must not be replaced by older ones).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass

import asyncpg

from ._config import check_schema
from ._postgres import check_server_version, translated
from ._roles import adopt_all
from .errors import DatabaseError

log = logging.getLogger(__name__)

LOCK_TIMEOUT = "3s"
DEFINITIONS = "functions"
"""The replaceable file (``functions.sql``), by its name in ``<schema>.definitions``."""
_WORD = re.compile(r"\bhotmesh(?=[._\"' ;,)]|_owner|_worker|_caller|_w_|_r_|_c_|_tools|$)", re.MULTILINE)


def checksum(sql: str) -> str:
    """What is recorded for an applied file: the sha256 of its text as shipped (with the schema named ``hotmesh``,
    so it is the same for every schema)."""
    return hashlib.sha256(sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return checksum(self.sql)


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


def definitions_sql() -> str:
    """``functions.sql``: every function of the schema and its grants, safe to run again."""
    return _read(f"{DEFINITIONS}.sql")


def render(sql: str, schema: str) -> str:
    """The SQL with the schema name (and the role names derived from it) written in."""
    check_schema(schema)
    return _WORD.sub(schema, sql)


def full_sql(schema: str) -> str:
    """Everything ``migrate`` would run on a fresh schema, for a DBA to read (``mcp-hotmesh sql``)."""
    parts = [render(_read("bootstrap.sql"), schema)]
    parts += [f"-- migration {m.version:03d}_{m.name}\nSET ROLE {schema}_owner;\n{render(m.sql, schema)}\nRESET ROLE;"
              for m in migrations()]
    parts.append(f"-- definitions ({DEFINITIONS}.sql)\nSET ROLE {schema}_owner;\n"
                 f"{render(definitions_sql(), schema)}\nRESET ROLE;")
    return "\n\n".join(parts)


async def migrate(conn: asyncpg.Connection, schema: str, *, lock_timeout: str = LOCK_TIMEOUT) -> list[int]:
    """Bring ``schema`` up to date; returns the numbered versions applied now (the definitions may be applied
    again without one: that is logged). ``conn`` must be the admin's.

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


@dataclass(frozen=True)
class _Recorded:
    """What a schema records as applied."""

    migrations: dict[int, str | None]  # version: checksum (None: applied before checksums were recorded)
    definitions: str | None  # checksum of functions.sql as last applied (None: never recorded)


async def _recorded(conn: asyncpg.Connection, schema: str) -> _Recorded | None:
    """None when the schema has no migrations table. Reads tables an earlier version made, too (no checksum
    column, no definitions table)."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".migrations'):
        return None
    rows = await conn.fetch(f'SELECT m.version, to_jsonb(m) ->> \'checksum\' AS checksum FROM "{schema}".migrations m')
    definitions = None
    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".definitions'):
        definitions = await conn.fetchval(
            f'SELECT checksum FROM "{schema}".definitions WHERE name = $1', DEFINITIONS
        )
    return _Recorded({r["version"]: r["checksum"] for r in rows}, definitions)


def _refusal(schema: str, recorded: _Recorded) -> str | None:
    """Why ``schema`` must not be migrated by this package, if it must not."""
    shipped = {m.version: m for m in migrations()}
    unknown = sorted(set(recorded.migrations) - set(shipped))
    if unknown:
        return (f"schema {schema} records migration {', '.join(f'{v:03d}' for v in unknown)}, which this "
                "mcp-hotmesh does not ship: a newer (or an unreleased) mcp-hotmesh migrated it. Use that version "
                "or a later one; this one would put its own functions in place of the schema's")
    for version, sum_ in sorted(recorded.migrations.items()):
        m = shipped[version]
        if sum_ is not None and sum_ != m.checksum:
            return (f"schema {schema} records migration {version:03d}_{m.name} with checksum {sum_[:12]}…, but this "
                    f"mcp-hotmesh ships it as {m.checksum[:12]}…: a landed migration never changes, so the schema "
                    "was migrated by an unreleased build. Migrate a new schema (--schema), or, if you know its "
                    "tables are what this migration makes, set that row's checksum to NULL and migrate again")
    return None


def _up_to_date(recorded: _Recorded) -> bool:
    for m in migrations():
        if m.version not in recorded.migrations or recorded.migrations[m.version] not in (None, m.checksum):
            return False
    return (set(recorded.migrations) <= {m.version for m in migrations()}
            and recorded.definitions == checksum(definitions_sql()))


async def _apply(conn: asyncpg.Connection, schema: str, lock_timeout: str) -> list[int]:
    await _bootstrap(conn, schema, lock_timeout)
    done = []
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
        await conn.execute(f'LOCK TABLE "{schema}".migrations IN SHARE ROW EXCLUSIVE MODE')
        recorded = await _recorded(conn, schema)
        assert recorded is not None  # the bootstrap made the table
        refusal = _refusal(schema, recorded)
        if refusal:
            raise DatabaseError(refusal)
        pending = [m for m in migrations() if m.version not in recorded.migrations]
        if pending and recorded.migrations:
            # An upgrade alters these tables while calls may be flowing. Each index, constraint and column takes
            # its own lock and keeps it to the commit, so a weaker lock taken first and a stronger one later
            # deadlocked with a call that had read a table and then wrote it (003's index on messages, then
            # 007's constraint). The strongest, on all of them, first: calls wait for the upgrade instead.
            await conn.execute(f'LOCK TABLE "{schema}".messages, "{schema}".workers, "{schema}".tools '
                               "IN ACCESS EXCLUSIVE MODE")
        for m in pending:
            await conn.execute(f'SET LOCAL ROLE "{schema}_owner"')
            await conn.execute(render(m.sql, schema))
            await conn.execute("RESET ROLE")
            await conn.execute(
                f'INSERT INTO "{schema}".migrations (version, name, checksum) VALUES ($1, $2, $3)',
                m.version, m.name, m.checksum,
            )
            done.append(m.version)
        definitions = definitions_sql()
        if done or recorded.definitions != checksum(definitions):
            # after every numbered migration (one may have dropped a function), and whenever the file changed
            await conn.execute(f'SET LOCAL ROLE "{schema}_owner"')
            await conn.execute(render(definitions, schema))
            await conn.execute("RESET ROLE")
            await conn.execute(
                f'INSERT INTO "{schema}".definitions AS d (name, checksum) VALUES ($1, $2) ON CONFLICT (name) '
                "DO UPDATE SET checksum = excluded.checksum, applied_at = now()",
                DEFINITIONS, checksum(definitions),
            )
            if not done:
                log.info("schema %s: function definitions applied again (%s.sql changed)", schema, DEFINITIONS)
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
    """Whether ``schema`` is what this package needs: every shipped migration recorded (with its checksum, or
    none from before checksums), no migration it does not ship, and the definitions applied as shipped."""
    with translated():
        recorded = await _recorded(conn, schema)
    return recorded is not None and _up_to_date(recorded)
