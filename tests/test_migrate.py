"""Migrations: idempotent, serialised, recorded, rendered for any valid schema name."""

from __future__ import annotations

import secrets

import anyio
import asyncpg
import pytest

from mcp_hotmesh._config import check_schema
from mcp_hotmesh._migrate import full_sql, is_migrated, migrate, migrations
from mcp_hotmesh.errors import ConfigError
from tests.conftest import PgServer, drop_schema

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
