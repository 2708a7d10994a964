"""Managed PostgreSQL (RDS, Cloud SQL, Azure, Supabase, Neon): the admin is no superuser but a role with
CREATEROLE and CREATEDB, in a database it created, logging in over TCP with its password.

The module's fixture makes that admin on the session's server with nothing else but what a superuser must grant
once (README, "Managed PostgreSQL"): ``GRANT SET ON PARAMETER app.allowed_streams``, without which no
non-superuser may store another role's allow-list (PostgreSQL 15+). Everything after that runs as the admin: a
schema migrated, roles provisioned, a worker and a caller, the operator's commands, the watchdog, ``serve``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import asyncpg
import pytest
from mcp import Client

from mcp_hotmesh._admin import DlqFilter, change_settings, dlq_list, dlq_purge, dlq_retry, settings, status
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._config import WorkerCredentials
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._migrate import is_migrated, migrate, migrations
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._roles import ProvisionedRole, list_roles, provision_role, revoke, rotate, set_limits
from mcp_hotmesh._serve import ServeOptions, running_gateway
from mcp_hotmesh._streams import CallerAPI, WorkerAPI
from mcp_hotmesh._worker import Worker
from mcp_hotmesh.errors import ConfigError, LoginRefused, QuotaExceeded
from mcp_hotmesh.examples import toolset
from tests.helpers import PgServer

pytestmark = pytest.mark.anyio

BOUND = 30.0  # seconds any wait below may take at most; each ends as soon as what it waits for is seen
STREAMS = list(toolset.topics)


@dataclass
class Managed:
    """The managed admin: its role, password and database on the session's server."""

    server: PgServer
    role: str
    password: str
    database: str

    def dsn(self, role: str | None = None, password: str | None = None) -> str:
        user, secret = (role, password) if role else (self.role, self.password)
        assert secret is not None
        return (f"postgresql://{quote(user, safe='')}:{quote(secret, safe='')}@{self.server.tcp_host}:"
                f"{self.server.tcp_port}/{self.database}")

    @property
    def base(self) -> str:
        """The DSN a worker gets, without a login: ``worker_credentials`` supply it."""
        return f"postgresql://{self.server.tcp_host}:{self.server.tcp_port}/{self.database}"

    def role_dsn(self, role: ProvisionedRole) -> str:
        return self.dsn(role.role, role.password)


@pytest.fixture(scope="module")
async def managed(pg_server: PgServer) -> AsyncIterator[Managed]:
    suffix = secrets.token_hex(3)
    m = Managed(pg_server, f"managed_admin_{suffix}", secrets.token_urlsafe(18), f"managed_{suffix}")
    superuser = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await superuser.execute(
            f"CREATE ROLE \"{m.role}\" LOGIN CREATEROLE CREATEDB PASSWORD '{m.password}'"  # what a provider gives
        )
        await superuser.execute(f'GRANT SET ON PARAMETER app.allowed_streams TO "{m.role}"')  # the one grant asked
        admin = await asyncpg.connect(m.dsn(), database=pg_server.database)
        try:
            await admin.execute(f'CREATE DATABASE "{m.database}"')  # the admin's own database, as on a provider
        finally:
            await admin.close()
        yield m
    finally:
        await superuser.execute(f'DROP DATABASE IF EXISTS "{m.database}" WITH (FORCE)')
        created = [r["rolname"] for r in await superuser.fetch(
            "SELECT r.rolname FROM pg_roles r JOIN pg_auth_members a ON a.roleid = r.oid "
            "JOIN pg_roles admin ON admin.oid = a.member WHERE admin.rolname = $1 AND a.admin_option", m.role)]
        for role in created:  # every role the admin made (PostgreSQL 16+: it holds ADMIN OPTION on each)
            await superuser.execute(f'DROP ROLE IF EXISTS "{role}"')
        await superuser.execute(f'REVOKE SET ON PARAMETER app.allowed_streams FROM "{m.role}"')
        await superuser.execute(f'DROP ROLE IF EXISTS "{m.role}"')
        await superuser.close()


@dataclass
class Schema:
    managed: Managed
    name: str
    admin: asyncpg.Connection

    async def provision(self, streams: list[str], kind: Any) -> ProvisionedRole:
        return await provision_role(self.admin, streams, kind, schema=self.name)


@pytest.fixture
async def schema(managed: Managed) -> AsyncIterator[Schema]:
    """A schema migrated by the managed admin, over TCP with its password."""
    admin = await asyncpg.connect(managed.dsn())
    name = "m_" + secrets.token_hex(5)
    try:
        assert not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert await migrate(admin, name) == [m.version for m in migrations()]
        yield Schema(managed, name, admin)
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND usename LIKE $1", name + "\\_%")
        await admin.close()


@contextlib.asynccontextmanager
async def worker_for(s: Schema, role: ProvisionedRole) -> AsyncIterator[Worker]:
    credentials = WorkerCredentials.model_validate({"user": role.role, "password": role.password})
    worker = Worker.from_toolset(toolset, connection=s.managed.base, credentials=credentials, schema=s.name,
                                 shutdown_grace=1.0)
    async with worker:
        yield worker


async def sessions(admin: asyncpg.Connection, role: str) -> int:
    count: int = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
    return count


async def wait_for(predicate: Any) -> None:
    with anyio.fail_after(BOUND):
        while not await predicate():  # noqa: ASYNC110 - polling the database, which has no event to await
            await anyio.sleep(0.05)


async def test_migrate_makes_the_same_schema_as_a_superuser_does(schema: Schema) -> None:
    s = schema.name
    assert await is_migrated(schema.admin, s)
    assert await migrate(schema.admin, s) == []
    # the owner owns everything and is powerless; the admin reaches the schema through it, as a member
    assert await schema.admin.fetchval(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = $1::regnamespace AND proowner <> $2::regrole",
        s, f"{s}_owner") == 0
    owner = await schema.admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", f"{s}_owner")
    assert owner is not None and not (owner["rolsuper"] or owner["rolcanlogin"] or owner["rolcreaterole"])
    assert await schema.admin.fetchval("SELECT pg_has_role(current_user, $1, 'USAGE')", f"{s}_owner")
    # every scoped function waits for a lock 2 s at most, as on any server
    assert await schema.admin.fetchval(
        "SELECT bool_and('lock_timeout=2s' = ANY (proconfig)) FROM pg_proc "
        "WHERE pronamespace = $1::regnamespace AND proname ~ '^(worker|caller)_'", s)


async def test_a_worker_and_a_caller_provisioned_by_it_serve_calls(schema: Schema) -> None:
    s, admin = schema.name, schema.admin
    worker_role = await schema.provision(STREAMS, "worker")
    caller_role = await schema.provision([*STREAMS, "nobody.serves"], "caller")
    assert {r.role: r.kind for r in await list_roles(admin, schema=s)} == {
        worker_role.role: "worker", caller_role.role: "caller"}
    pool = await create_pool(schema.managed.role_dsn(caller_role), min_size=1, max_size=2)
    try:
        caller = CallerAPI(pool, s)
        async with worker_for(schema, worker_role):
            call_id = await caller.call("echo", "", {"text": "managed"}, 20_000)

            async def answered() -> bool:
                return (await caller.result(call_id)).finished

            await wait_for(answered)
            done = await caller.result(call_id)
            assert (done.state, done.result) == ("done", {"text": "managed", "length": 7})

            # status: the streams, the live worker, the roles' sessions
            now = await status(admin, s)
            echo = next(row for row in now.streams if row.stream == "echo")
            assert echo.live_workers == 1 and echo.done == 1
            assert {r.role for r in now.roles} >= {worker_role.role, caller_role.role}

        # dlq: a call whose handler failed for good (the admin answers as a worker, the seed's standard mode) is
        # dead; retried, then purged
        as_worker = WorkerAPI(admin, s)

        async def fail_it() -> None:
            [msg] = await as_worker.dequeue("nobody.serves", "admin", 1, 5_000)
            assert await as_worker.fail("nobody.serves", msg.id, msg.lease, "broken for good", None)

        dead_id = await caller.call("nobody.serves", "", {"x": 1}, 60_000)
        await fail_it()
        [dead] = await dlq_list(admin, s, DlqFilter(stream="nobody.serves"))
        assert dead.call_id == dead_id and dead.error == "broken for good"
        [retried] = await dlq_retry(admin, s, DlqFilter(ids=[dead.id]))
        assert retried.new_id == dead.id and (await caller.result(dead_id)).state == "ready"
        await fail_it()
        assert await dlq_purge(admin, s, DlqFilter(stream="nobody.serves")) == 1
        assert await dlq_list(admin, s, DlqFilter()) == []

        # settings and limits
        changed = await change_settings(admin, s, {"retention_ms": 60_000})
        assert changed["retention_ms"] == 60_000 == (await settings(admin, s))["retention_ms"]
        limits = await set_limits(admin, caller_role.role, schema=s, connection_limit=5, max_queued=0)
        assert (limits.connection_limit, limits.max_queued) == (5, 0)
        with pytest.raises(QuotaExceeded):
            await caller.call("echo", "", {"text": "over"}, 20_000)
    finally:
        await pool.close()


async def test_without_the_one_grant_provision_says_what_to_grant(schema: Schema, pg_server: PgServer) -> None:
    superuser = await asyncpg.connect(pg_server.admin_dsn)
    user = schema.managed.role
    try:
        await superuser.execute(f'REVOKE SET ON PARAMETER app.allowed_streams FROM "{user}"')
        with pytest.raises(ConfigError, match=f"GRANT SET ON PARAMETER app.allowed_streams TO {user}"):
            await schema.provision(["echo"], "worker")
        assert await list_roles(schema.admin, schema=schema.name) == []  # nothing made
    finally:
        await superuser.execute(f'GRANT SET ON PARAMETER app.allowed_streams TO "{user}"')
        await superuser.close()
    assert (await schema.provision(["echo"], "worker")).streams == ["echo"]


async def test_rotate_and_revoke_work_and_revoke_ends_the_roles_sessions(schema: Schema) -> None:
    s, admin = schema.name, schema.admin
    role = await schema.provision(["echo"], "caller")
    rotated = await rotate(admin, role.role, schema=s)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(schema.managed.role_dsn(role))
    conn = await asyncpg.connect(schema.managed.role_dsn(rotated))
    idle_in_transaction = await asyncpg.connect(schema.managed.role_dsn(rotated))
    try:
        await idle_in_transaction.execute("BEGIN")
        await idle_in_transaction.fetch(f'SELECT * FROM "{s}".caller_tools()')
        assert await sessions(admin, role.role) == 2
        assert await revoke(admin, role.role, schema=s) == 2
        assert await sessions(admin, role.role) == 0  # revoke waits until they have ended
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):  # NOLOGIN
            await asyncpg.connect(schema.managed.role_dsn(rotated))
        [info] = [r for r in await list_roles(admin, schema=s) if r.role == role.role]
        assert not info.can_login and info.streams == [] and info.revoked_at is not None
    finally:
        await conn.close(timeout=1)
        idle_in_transaction.terminate()


async def test_the_watchdog_ends_a_scoped_session_idle_in_a_transaction(schema: Schema) -> None:
    s, admin = schema.name, schema.admin
    await admin.execute(f"UPDATE \"{s}\".settings SET value = 300 WHERE key = 'watchdog_idle_ms'")
    bad = await schema.provision(["a"], "caller")
    watcher = await schema.provision(["b"], "worker")
    idle = await asyncpg.connect(schema.managed.role_dsn(bad))
    pool = await create_pool(schema.managed.role_dsn(watcher), min_size=1, max_size=1)
    try:
        await idle.execute("BEGIN")
        await idle.fetch(f'SELECT * FROM "{s}".caller_tools()')
        pid = idle.get_server_pid()
        api = WorkerAPI(pool, s)
        ended: list[Any] = []

        async def ended_it() -> bool:
            ended.extend(await api.watchdog())
            return any(e.pid == pid for e in ended)

        await wait_for(ended_it)
        assert [(e.role, e.reason) for e in ended if e.pid == pid] == [(bad.role, "idle in a transaction")]

        async def gone() -> bool:
            return await sessions(admin, bad.role) == 0

        await wait_for(gone)
    finally:
        idle.terminate()
        await pool.close()


async def test_serve_starts_with_the_managed_admins_dsn(managed: Managed) -> None:
    """``serve`` with the admin's DSN on a schema that does not exist yet: migrates, makes its gateway roles,
    serves through them with an attached worker; a second start takes the roles over again."""
    name = "m_" + secrets.token_hex(5)
    options = ServeOptions(dsn=managed.dsn(), schema=name, no_worker=False, timeout=20.0)
    for text in ("first start", "second start"):
        async with running_gateway(options) as engine:
            assert engine.role == f"{name}_c_gateway"

            async def ready(engine: Engine = engine) -> bool:
                await engine.refresh()
                return {t.name for t in engine.tools() if t.live_workers} >= {t.name for t in toolset.tools}

            await wait_for(ready)
            async with Client(McpGateway(engine).server) as client:
                result = await client.call_tool("echo", {"text": text})
            assert not result.is_error and result.structured_content == {"text": text, "length": len(text)}
    admin = await asyncpg.connect(managed.dsn())
    try:
        assert await is_migrated(admin, name)
        with pytest.raises(LoginRefused):  # the first start's password is gone: each start makes a new one
            await create_pool(managed.dsn(f"{name}_c_gateway", "not-its-password"))
    finally:
        await admin.close()
