"""Migrations: idempotent, serialised, recorded with checksums, rendered for any valid schema name; the
definitions applied again when they change, and a schema this version must not touch refused.

Upgrades from earlier landed versions, with workers attached: test_upgrade.py.
"""

from __future__ import annotations

import secrets

import anyio
import asyncpg
import pytest

from mcp_hotmesh._config import check_schema
from mcp_hotmesh._migrate import checksum, definitions_sql, full_sql, is_migrated, migrate, migrations
from mcp_hotmesh.errors import ConfigError, DatabaseError
from tests.conftest import Env, PgServer, drop_schema

pytestmark = pytest.mark.anyio


async def test_concurrent_migrations_apply_each_version_once(pg_server: PgServer) -> None:
    schema = "t_" + secrets.token_hex(5)
    conns = [await asyncpg.connect(pg_server.admin_dsn) for _ in range(3)]
    results: list[list[int]] = []
    try:

        async def run(conn: asyncpg.Connection) -> None:
            results.append(await migrate(conn, schema))

        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(run, conn)
        applied = sorted(v for r in results for v in r)
        assert applied == [m.version for m in migrations()]  # each version applied by exactly one of them
        assert await is_migrated(conns[0], schema)
        assert await migrate(conns[0], schema) == []  # idempotent
        rows = await conns[0].fetch(f'SELECT version FROM "{schema}".migrations ORDER BY version')
        assert [r["version"] for r in rows] == [m.version for m in migrations()]
    finally:
        await drop_schema(conns[0], schema)
        for conn in conns:
            await conn.close()


def test_schema_names_are_checked_before_any_sql_is_written() -> None:
    for bad in ["", "Hotmesh", "1abc", 'a"; drop', "a-b", "x" * 41]:
        with pytest.raises(ConfigError):
            check_schema(bad)
        with pytest.raises(ConfigError):
            full_sql(bad)


def test_rendered_sql_names_only_the_chosen_schema() -> None:
    sql = full_sql("acme")
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    assert "hotmesh" not in code
    assert "acme.worker_dequeue" in code and "acme_owner" in code and "'acme_w_'" in code


async def functions_catalog(conn: asyncpg.Connection, schema: str) -> list[tuple[str, str, list[str], str]]:
    rows = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS sig, pg_get_functiondef(p.oid) AS definition, p.proconfig AS config, "
        "p.proacl::text AS acl FROM pg_proc p WHERE p.pronamespace = $1::regnamespace ORDER BY 1", schema)
    return [(r["sig"], r["definition"], r["config"], r["acl"]) for r in rows]


async def test_changed_definitions_are_applied_again_keeping_grants_and_settings(env: Env) -> None:
    """A schema whose functions.sql checksum differs (a newer file shipped) gets the definitions again, and
    nothing else changes: owners, SET clauses (lock_timeout on every scoped function) and grants, a grant made by
    hand on the seed's manual path included."""
    s = env.schema
    manual = "t_manual_" + secrets.token_hex(3)
    await env.admin.execute(f'CREATE ROLE "{manual}" NOLOGIN')
    try:
        await env.admin.execute(f'GRANT EXECUTE ON FUNCTION "{s}".caller_tools() TO "{manual}"')
        before = await functions_catalog(env.admin, s)
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
