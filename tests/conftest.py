"""Test fixtures: one real PostgreSQL per session, a fresh schema per test, roles logged in with passwords.

The server is the embedded one, started in a temporary data directory on a free port, unless
``HOTMESH_TEST_DSN`` names an existing server (a superuser's DSN): the package's pytest plugin starts it
(``hotmesh_postgres``), as it does for a tool author's tests. Either way roles log in over TCP with
scram-sha-256, so a wrong or rotated password is really refused.

Only fixtures live here; the classes and functions the tests share are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mcp_hotmesh._migrate import migrate
from mcp_hotmesh.testing import Postgres
from tests.helpers import Env, Hub, PgServer, drop_schema, http_server, hub_for


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server(hotmesh_postgres: Postgres) -> PgServer:
    """The session's server, as the package's pytest plugin starts it for any tool author's tests."""
    pg = hotmesh_postgres
    return PgServer(pg.admin_dsn, pg.host, pg.port, pg.database)


@pytest.fixture
async def env(pg_server: PgServer) -> AsyncIterator[Env]:
    schema = "t_" + secrets.token_hex(5)
    admin = await asyncpg.connect(pg_server.admin_dsn)
    await migrate(admin, schema)
    # Tests use short leases so reclaim can be seen quickly.
    await admin.execute(f'UPDATE "{schema}".settings SET value = 50 WHERE key = $1', "min_lease_ms")
    # Workers' tool definitions go live at once, as in development: the approval of definitions has tests of its
    # own (test_tool_definitions.py), which turn it back on.
    await admin.execute(f'UPDATE "{schema}".settings SET value = 0 WHERE key = $1', "approve_tools")
    env = Env(pg_server, schema, admin)
    try:
        yield env
    finally:
        for pool in env._pools:
            pool.terminate()
        await drop_schema(admin, schema)
        await admin.close()


@pytest.fixture(scope="session", autouse=True)
def _server_user_reaches_tmp_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    """As root the embedded server runs as its own OS user, and pytest's temporary directories are private to
    root (0700). Tests that start a server of their own in ``tmp_path`` give that user a way in, as a person
    choosing a data directory would: search permission on pytest's base directories (never on anything else)."""
    if os.geteuid() == 0:
        base = tmp_path_factory.getbasetemp()
        for directory in (base.parent, base):
            directory.chmod(directory.stat().st_mode | 0o001)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """pytest's ``tmp_path``, searchable by the embedded server's OS user when we are root (see above)."""
    if os.geteuid() == 0:
        tmp_path.chmod(0o755)
    return tmp_path


@pytest.fixture
async def http_hub(env: Env) -> AsyncIterator[tuple[Hub, str]]:
    """``hub_for(env)`` on Streamable HTTP with ``helpers.TOKEN``: the hub and the server's base URL."""
    async with hub_for(env) as hub, http_server(hub.gateway) as url:
        yield hub, url
