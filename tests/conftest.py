"""Test fixtures: one real PostgreSQL per session, a fresh schema per test, roles logged in with passwords.

The server is the embedded one, started in a temporary data directory on a free port, unless
``HOTMESH_TEST_DSN`` names an existing server (a superuser's DSN). Either way roles log in over TCP with
scram-sha-256, so a wrong or rotated password is really refused.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from mcp_hotmesh import _embedded as embedded
from mcp_hotmesh._config import WorkerCredentials, connection_dsn
from mcp_hotmesh._migrate import migrate
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._roles import Kind, ProvisionedRole, provision_role
from mcp_hotmesh._streams import CallerAPI, WorkerAPI


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class PgServer:
    admin_dsn: str
    tcp_host: str
    tcp_port: int
    database: str
    embedded: embedded.EmbeddedServer | None = None

    def role_dsn(self, role: str, password: str) -> str:
        """A TCP DSN for a role, as a worker on another machine would use."""
        base = f"postgresql://{self.tcp_host}:{self.tcp_port}/{self.database}"
        return connection_dsn(base, WorkerCredentials(user=role, password=password))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    dsn = os.environ.get("HOTMESH_TEST_DSN")
    if dsn:
        parts = urlsplit(dsn)
        yield PgServer(dsn, parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.lstrip("/") or "postgres")
        return
    root = Path(tempfile.mkdtemp(prefix="hotmesh-test-"))
    root.chmod(0o755)
    server = embedded.start(root / "data")
    try:
        yield PgServer(server.admin_dsn, "127.0.0.1", server.port, embedded.DATABASE, server)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Env:
    """One test's schema on the session's server, with helpers to make roles and APIs."""

    server: PgServer
    schema: str
    admin: asyncpg.Connection
    _pools: list[asyncpg.Pool] = field(default_factory=list)

    async def provision(self, streams: list[str], kind: Kind, password: str | None = None) -> ProvisionedRole:
        return await provision_role(self.admin, streams, kind, schema=self.schema, password=password)

    def dsn(self, role: ProvisionedRole) -> str:
        return self.server.role_dsn(role.role, role.password)

    async def pool(self, role: ProvisionedRole | None = None, **kwargs: Any) -> asyncpg.Pool:
        dsn = self.dsn(role) if role else self.server.admin_dsn
        pool = await create_pool(dsn, **kwargs)
        self._pools.append(pool)
        return pool

    async def worker(self, streams: list[str]) -> tuple[ProvisionedRole, WorkerAPI]:
        role = await self.provision(streams, "worker")
        return role, WorkerAPI(await self.pool(role), self.schema)

    async def caller(self, streams: list[str]) -> tuple[ProvisionedRole, CallerAPI]:
        role = await self.provision(streams, "caller")
        return role, CallerAPI(await self.pool(role), self.schema)

    async def connect(self, role: ProvisionedRole) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn(role))

    async def set(self, key: str, value: int) -> None:
        """Change an admin setting (lease bounds, size limits) in this test's schema."""
        await self.admin.execute(f'UPDATE "{self.schema}".settings SET value = $2 WHERE key = $1', key, value)

    async def message(self, id: int) -> asyncpg.Record:
        row = await self.admin.fetchrow(f'SELECT * FROM "{self.schema}".messages WHERE id = $1', id)
        assert row is not None
        return row

    async def call_row(self, call_id: Any) -> asyncpg.Record:
        row = await self.admin.fetchrow(f'SELECT * FROM "{self.schema}".messages WHERE call_id = $1', call_id)
        assert row is not None
        return row


async def drop_schema(admin: asyncpg.Connection, schema: str) -> None:
    """Remove a test schema and every role made for it."""
    roles = [
        r["rolname"]
        for r in await admin.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE $1 ESCAPE '\\'", schema.replace("_", "\\_") + "\\_%"
        )
    ]
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])", roles
    )
    await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    for role in roles:
        await admin.execute(f'DROP OWNED BY "{role}" CASCADE')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
async def env(pg_server: PgServer) -> AsyncIterator[Env]:
    schema = "t_" + secrets.token_hex(5)
    admin = await asyncpg.connect(pg_server.admin_dsn)
    await migrate(admin, schema)
    # Tests use short leases so reclaim can be seen quickly.
    await admin.execute(f'UPDATE "{schema}".settings SET value = 50 WHERE key = $1', "min_lease_ms")
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
