"""Upgrades: ``migrate`` brings a schema left by an earlier landed version to what this version needs, with a
worker and a gateway attached to it the whole time, and leaves the catalog of a fresh install; changed
definitions are applied again, keeping grants and settings; a schema this version must not touch is refused.

The earlier SQL is kept as it was at each commit under ``tests/fixtures/sql_<commit>/`` and applied as ``migrate``
applied it then: the bootstrap, then each numbered migration as the owner role, recorded by version and name
(there were no checksums yet).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from mcp import Client

from mcp_hotmesh._caller import Engine
from mcp_hotmesh._config import WorkerCredentials
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._migrate import checksum, definitions_sql, full_sql, is_migrated, migrate, migrations, render
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._roles import provision_role, set_limits
from mcp_hotmesh._streams import CallerAPI, WorkerAPI
from mcp_hotmesh._worker import Worker
from mcp_hotmesh.errors import DatabaseError, QuotaExceeded
from mcp_hotmesh.examples import toolset
from tests.helpers import Env, PgServer, drop_schema

SINCE_003 = [m.version for m in migrations() if m.version >= 3]
"""The migrations a schema of 001 and 002 (as the released versions left it) still needs."""

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).parent / "fixtures"
LANDED = ["ef14fba", "30f23b9"]  # the last landed version; the first with 002, whose 001 was edited after it
SINCE_LANDED = [m.version for m in migrations() if m.version > 2]  # what a landed schema has yet to apply


async def migrate_as_at(admin: asyncpg.Connection, schema: str, commit: str) -> list[int]:
    """What ``migrate`` of ``commit`` did to a new schema; returns the versions it recorded."""
    sql = FIXTURES / f"sql_{commit}"
    async with admin.transaction():
        await admin.execute(render((sql / "bootstrap.sql").read_text(encoding="utf-8"), schema))
    versions = []
    async with admin.transaction():
        for path in sorted(sql.glob("[0-9][0-9][0-9]_*.sql")):
            version, name = int(path.name[:3]), path.stem[4:]
            await admin.execute(f'SET LOCAL ROLE "{schema}_owner"')
            await admin.execute(render(path.read_text(encoding="utf-8"), schema))
            await admin.execute("RESET ROLE")
            await admin.execute(f'INSERT INTO "{schema}".migrations (version, name) VALUES ($1, $2)', version, name)
            versions.append(version)
    return versions


async def catalog(admin: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """Everything of ``schema`` the code relies on, with the schema's name written as ``S``: each function's
    definition (body, SET clauses, security), owner and grants; each table's columns, owner and grants; indexes
    and constraints; the settings."""

    def named(value: Any) -> Any:
        return value.replace(schema, "S") if isinstance(value, str) else value

    def rows(records: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
        return sorted(tuple(named(v) for v in r.values()) for r in records)

    return {
        "functions": {
            named(r["sig"]): (named(r["definition"]), r["config"], named(r["acl"]), named(r["owner"]))
            for r in await admin.fetch(
                "SELECT p.oid::regprocedure::text AS sig, pg_get_functiondef(p.oid) AS definition, "
                "p.proconfig AS config, p.proacl::text AS acl, p.proowner::regrole::text AS owner "
                "FROM pg_proc p WHERE p.pronamespace = $1::regnamespace", schema)
        },
        "columns": rows(await admin.fetch(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
            "pg_get_expr(d.adbin, d.adrelid), a.attidentity "
            "FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum "
            "WHERE c.relnamespace = $1::regnamespace AND c.relkind = 'r'", schema)),
        "relations": rows(await admin.fetch(
            "SELECT relname, relkind::text, relowner::regrole::text, relacl::text, reloptions "
            "FROM pg_class WHERE relnamespace = $1::regnamespace", schema)),
        "indexes": rows(await admin.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema)),
        "constraints": rows(await admin.fetch(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = $1::regnamespace", schema)),
        "schema": rows(await admin.fetch(
            "SELECT nspowner::regrole::text, nspacl::text FROM pg_namespace WHERE nspname = $1", schema)),
        "settings": rows(await admin.fetch(f'SELECT key, value FROM "{schema}".settings')),
    }


@pytest.fixture
async def admin(pg_server: PgServer) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_server.admin_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def schemas(admin: asyncpg.Connection, count: int) -> AsyncIterator[list[str]]:
    names = ["u_" + secrets.token_hex(5) for _ in range(count)]
    try:
        yield names
    finally:
        for name in names:
            await drop_schema(admin, name)


@pytest.mark.parametrize("commit", LANDED)
async def test_a_landed_schema_ends_with_the_catalog_of_a_fresh_install(admin: asyncpg.Connection,
                                                                        commit: str) -> None:
    async with schemas(admin, 2) as (old, fresh):
        assert await migrate_as_at(admin, old, commit) == [1, 2]
        await migrate(admin, fresh)
        before = await catalog(admin, old)
        expected = await catalog(admin, fresh)
        missing = set(expected["functions"]) - set(before["functions"])
        assert {"S.worker_watchdog()", "S.caller_watchdog()"} <= missing  # what 003 brought
        if commit == "30f23b9":  # recorded 001 and 002, yet lacked what the current code calls on every request
            assert {"S.caller_call_many(text[],text[],jsonb[],integer[])", "S.caller_results(uuid[])"} <= missing
        assert not await is_migrated(admin, old)

        assert await migrate(admin, old) == SINCE_003

        assert await is_migrated(admin, old)
        after = await catalog(admin, old)
        # nothing an earlier definition may call is gone: a call running it while migrate commits still finds it
        assert set(before["functions"]) <= set(after["functions"])
        assert after["functions"] == expected["functions"]
        assert after == expected
        recorded = await admin.fetch(f'SELECT version, checksum FROM "{old}".migrations ORDER BY version')
        assert [(r["version"], r["checksum"]) for r in recorded] == [
            (m.version, None if m.version <= 2 else m.checksum) for m in migrations()  # 001, 002: before checksums
        ]
        assert await admin.fetchval(f'SELECT checksum FROM "{old}".definitions') == checksum(definitions_sql())
        assert await migrate(admin, old) == []
        assert await catalog(admin, old) == expected


async def test_calls_flow_before_during_and_after_an_upgrade(
    admin: asyncpg.Connection, pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker and a gateway of this version run on a schema of the last landed version (what an operator has
    while rolling out), migrate runs under them, and every call before, during and after it is answered, with
    no claim or answer of the worker failing meanwhile; the sessions they opened before it use the new
    definitions after it (a caller's queue quota, the watchdog)."""
    caplog.set_level(logging.WARNING, logger="mcp_hotmesh._consumer")
    async with schemas(admin, 1) as (schema,), contextlib.AsyncExitStack() as stack:
        await migrate_as_at(admin, schema, "ef14fba")
        streams = list(toolset.topics)
        worker_role = await provision_role(admin, streams, "worker", schema=schema)
        caller_role = await provision_role(admin, streams, "caller", schema=schema)
        # provisioned before the watchdog existed: the owner was no member of the roles it watches
        for role in (worker_role.role, caller_role.role):
            await admin.execute(f'REVOKE "{role}" FROM "{schema}_owner"')

        base = f"postgresql://{pg_server.tcp_host}:{pg_server.tcp_port}/{pg_server.database}"
        credentials = WorkerCredentials.model_validate({"user": worker_role.role, "password": worker_role.password})
        worker = Worker.from_toolset(toolset, connection=base, credentials=credentials, schema=schema,
                                     shutdown_grace=1.0)
        await stack.enter_async_context(worker)
        caller_dsn = pg_server.role_dsn(caller_role.role, caller_role.password)
        pool = await create_pool(caller_dsn, min_size=1, max_size=4)
        stack.push_async_callback(pool.close)
        engine = Engine(pool, schema=schema, role=caller_role.role, listen_dsn=caller_dsn, timeout=30.0,
                        max_args_bytes=4096)
        await stack.enter_async_context(engine)
        with anyio.fail_after(20):
            while not {t.name for t in engine.tools() if t.live_workers} >= {t.name for t in toolset.tools}:
                await engine.refresh()
                await anyio.sleep(0.05)
        client = await stack.enter_async_context(Client(McpGateway(engine).server))

        async def echo(text: str) -> None:
            result = await client.call_tool("echo", {"text": text})
            assert not result.is_error, result.content
            assert result.structured_content == {"text": text, "length": len(text)}

        await echo("before")
        assert (await client.call_tool("math_add", {"a": 2, "b": 3})).structured_content == {"result": 5}

        migrated = anyio.Event()
        answered_during = 0

        async def keep_calling() -> None:
            nonlocal answered_during
            while not migrated.is_set():
                await echo(f"during {answered_during}")
                answered_during += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_calling)
            assert await migrate(admin, schema) == SINCE_003
            migrated.set()

        await echo("after")
        assert (await client.call_tool("math_multiply", {"a": 6, "b": 7})).structured_content == {"result": 42}
        assert await is_migrated(admin, schema)
        # the pool opened before the upgrade calls the new caller_call: the caller's queue quota holds
        api = CallerAPI(pool, schema)
        await set_limits(admin, caller_role.role, schema=schema, max_queued=0)
        with pytest.raises(QuotaExceeded):
            await api.call("echo", "", {"text": "over quota"}, 10_000)
        await set_limits(admin, caller_role.role, schema=schema, max_queued=-1)
        await echo("after the quota")
        # the functions 003 brought, called by sessions of both roles opened before it
        assert await api.watchdog() == []
        group = worker.consumers[0].api
        assert isinstance(group, WorkerAPI)
        assert await group.watchdog() == []
        # roles provisioned before the watchdog are watched now (migrate adopted them)
        for role in (worker_role.role, caller_role.role):
            assert await admin.fetchval("SELECT pg_has_role($1, $2, 'USAGE')", f"{schema}_owner", role)
        assert await admin.fetchval(
            f"SELECT count(*) FROM \"{schema}\".messages WHERE state = 'done' AND NOT is_error"
        ) == 5 + answered_during
    # a claim or an answer that failed (a function gone while a call ran its earlier definition) is retried and
    # the call still answered, later: it shows here
    assert [r.getMessage() for r in caplog.records if r.name == "mcp_hotmesh._consumer"] == []


async def functions_catalog(conn: asyncpg.Connection, schema: str) -> list[tuple[str, str, list[str], str]]:
    rows = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS sig, pg_get_functiondef(p.oid) AS definition, p.proconfig AS config, "
        "p.proacl::text AS acl FROM pg_proc p WHERE p.pronamespace = $1::regnamespace ORDER BY 1", schema)
    return [(r["sig"], r["definition"], r["config"], r["acl"]) for r in rows]


async def test_changed_definitions_are_applied_again_keeping_grants_and_settings(env: Env) -> None:
    """A schema whose functions.sql checksum differs (another file applied) gets the definitions again, with their
    owners, SET clauses (lock_timeout on every scoped function) and grants, a grant made by hand on the seed's
    manual path included."""
    s = env.schema
    manual = "t_manual_" + secrets.token_hex(3)
    await env.admin.execute(f'CREATE ROLE "{manual}" NOLOGIN')
    try:
        await env.admin.execute(f'GRANT EXECUTE ON FUNCTION "{s}".caller_tools() TO "{manual}"')
        before = await functions_catalog(env.admin, s)
        # what an earlier file left: a function's settings as CREATE OR REPLACE leaves them, another's body
        await env.admin.execute(f'ALTER FUNCTION "{s}".caller_tools() RESET ALL')
        await env.admin.execute(f'CREATE OR REPLACE FUNCTION "{s}"._clamp_lease(p_lease_ms integer) RETURNS integer '
                                "LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$ SELECT 1000 $$")
        assert await functions_catalog(env.admin, s) != before
        await env.admin.execute(f'UPDATE "{s}".definitions SET checksum = $1', "from another file")
        assert not await is_migrated(env.admin, s)
        assert await migrate(env.admin, s) == []  # no numbered migration: only the definitions, again
        assert await is_migrated(env.admin, s)
        assert await env.admin.fetchval(f'SELECT checksum FROM "{s}".definitions') == checksum(definitions_sql())
        assert await functions_catalog(env.admin, s) == before
        assert await env.admin.fetchval(
            f"SELECT has_function_privilege($1, '\"{s}\".caller_tools()', 'EXECUTE')", manual)
    finally:
        await env.admin.execute(f'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA "{s}" FROM "{manual}"')
        await env.admin.execute(f'DROP ROLE "{manual}"')


async def test_a_migration_applied_before_checksums_counts_as_applied(env: Env) -> None:
    await env.admin.execute(f'UPDATE "{env.schema}".migrations SET checksum = NULL WHERE version = 1')
    assert await is_migrated(env.admin, env.schema)
    assert await migrate(env.admin, env.schema) == []


async def test_an_edited_migration_or_a_newer_schema_is_refused(env: Env) -> None:
    """A recorded checksum that is not the shipped file's (a landed migration edited, or an unreleased build), or
    a version this package does not ship (a newer mcp-hotmesh migrated the schema): migrate changes nothing and
    says why, rather than put its own functions over the schema's."""
    s = env.schema
    before = await functions_catalog(env.admin, s)
    await env.admin.execute(f'UPDATE "{s}".migrations SET checksum = $1 WHERE version = 2', "0" * 64)
    assert not await is_migrated(env.admin, s)
    with pytest.raises(DatabaseError, match="records migration 002_operations with checksum 000000000000"):
        await migrate(env.admin, s)
    await env.admin.execute(f'UPDATE "{s}".migrations SET checksum = NULL WHERE version = 2')
    await env.admin.execute(f"INSERT INTO \"{s}\".migrations (version, name, checksum) VALUES (999, 'later', 'x')")
    await env.admin.execute(f'UPDATE "{s}".definitions SET checksum = $1', "a newer file")
    with pytest.raises(DatabaseError, match="records migration 999, which this mcp-hotmesh does not ship"):
        await migrate(env.admin, s)
    assert await functions_catalog(env.admin, s) == before
    assert await env.admin.fetchval(f'SELECT checksum FROM "{s}".definitions') == "a newer file"


def test_every_shipped_file_is_in_the_sql_a_dba_reads() -> None:
    sql = full_sql("hotmesh")
    assert definitions_sql() in sql and all(m.sql in sql for m in migrations())
    assert "DROP FUNCTION" not in definitions_sql()  # nothing an earlier definition calls may go (see its header)
