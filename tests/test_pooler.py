"""Behind a transaction pooler: a real PgBouncer in transaction mode between the components and PostgreSQL.

Each test that needs one starts its own PgBouncer (``pool_mode = transaction``, two server connections per role)
on a free port, in front of the tests' PostgreSQL. It logs the roles in with scram-sha-256 through ``auth_query``,
as one set up for roles with changing passwords would be. Pools go through it (``pooler="transaction"``: no
prepared statements kept); LISTEN goes to PostgreSQL itself (``listen_dsn``). The worker is the real
``mcp-hotmesh worker`` process, the gateway a real ``Engine`` in this process, or all of ``serve``'s setup with an
admin DSN.

Where each session comes from is read from both ends: PgBouncer logs the local port of each server connection it
opens, and PostgreSQL's ``pg_stat_activity`` shows the client port of each session.

Skipped when no ``pgbouncer`` is installed (on PATH, or /usr/sbin/pgbouncer as Debian's package puts it).
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import anyio
import asyncpg
import pytest
from mcp import Client
from pydantic import SecretStr

from mcp_hotmesh import ConfigError, LoginRefused, ToolSet, Worker
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._config import Pooler, dsn_user
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._retry import LOGIN_GRACE
from mcp_hotmesh._role_engines import RoleEngines
from mcp_hotmesh._roles import revoke
from mcp_hotmesh._serve import ServeOptions, running_gateway
from tests.helpers import GATEWAY_TOOLS, Env, WorkerProcs, free_port, text_of, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # a PgBouncer process, a worker process

SERVER_CONNECTIONS = 2
"""PgBouncer's server connections per role (``default_pool_size``): fewer than a pool's 10 clients."""

# The worker's tool module, after helpers.TOOLS_PREAMBLE (toolset, MARKS).
TOOLS = '''
@toolset.tool(topic="pooled.echo", name="pooled_echo")
async def echo(text: str) -> dict[str, str]:
    """Return the text."""
    return {"text": text}


@toolset.tool(topic="pooled.block", name="pooled_block")
async def block() -> dict[str, str]:
    """Wait until cancelled."""
    try:
        await anyio.sleep(120)
    except anyio.get_cancelled_exc_class():
        (MARKS / f"cancelled-{os.getpid()}").touch()
        raise
    return {}
'''
STREAMS = ["pooled.echo", "pooled.block"]
QUIET = ("--poll-interval", "60")
"""No fallback poll while a test runs: a call is answered only if its NOTIFY was heard."""


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"
    return found


@dataclass
class PgBouncer:
    port: int
    database: str
    log: Path
    version: tuple[int, ...]

    def dsn(self, user: str, password: str | None = None) -> str:
        login = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
        return f"postgresql://{login}@127.0.0.1:{self.port}/{self.database}"

    @property
    def base_dsn(self) -> str:
        """PgBouncer's address without a login, as a worker given ``--user`` and ``--password`` is given it."""
        return f"postgresql://127.0.0.1:{self.port}/{self.database}"

    def server_ports(self, role: str) -> set[int]:
        """The local ports of the server connections PgBouncer opened for ``role``, as it logs them."""
        pattern = re.compile(rf" {re.escape(self.database)}/{re.escape(role)}@\S+ new connection to server "
                             r"\(from \S+:(\d+)\)")
        return {int(m.group(1)) for m in pattern.finditer(self.log.read_text(errors="replace"))}


def launch(binary: str, directory: Path, env: Env, port: int, auth_user: str,
           auth_password: str) -> subprocess.Popen[bytes]:
    """PgBouncer in transaction mode in front of the tests' PostgreSQL, its files and log in ``directory``."""
    config = directory / "pgbouncer.ini"
    (directory / "userlist.txt").write_text(f'"{auth_user}" "{auth_password}"\n')
    config.write_text(f"""\
[databases]
{env.server.database} = host={env.server.tcp_host} port={env.server.tcp_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pool_mode = transaction
default_pool_size = {SERVER_CONNECTIONS}
auth_type = scram-sha-256
auth_file = {directory / "userlist.txt"}
auth_user = {auth_user}
auth_query = SELECT usename, passwd FROM "{env.schema}".pgbouncer_secret($1)
""")
    command = [binary, str(config)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root: it switches to -u USER, who must read its files
        nobody = pwd.getpwnam("nobody")
        for path in (directory, *directory.iterdir()):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        command[1:1] = ["-u", "nobody"]
    with open(directory / "pgbouncer.log", "wb") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def version_of(binary: str) -> tuple[int, ...]:
    """``(1, 18, 0)`` for "PgBouncer 1.18.0", the first line ``pgbouncer --version`` prints."""
    first = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    return tuple(int(part) for part in first.split()[-1].split("."))


@pytest.fixture
async def pgbouncer(env: Env) -> AsyncIterator[PgBouncer]:
    binary = pgbouncer_binary()
    if binary is None:
        pytest.skip("PgBouncer is not installed (no pgbouncer on PATH, no /usr/sbin/pgbouncer)")
    # auth_query: PgBouncer reads a role's SCRAM secret through a function its own login may call, and logs the
    # role in to PostgreSQL with the keys of the client's SCRAM exchange
    auth_user, auth_password = f"{env.schema}_pgbouncer", secrets.token_hex(16)
    await env.admin.execute(f'CREATE ROLE "{auth_user}" LOGIN PASSWORD \'{auth_password}\'')
    await env.admin.execute(
        f'CREATE FUNCTION "{env.schema}".pgbouncer_secret(p_user text, OUT usename name, OUT passwd text) '
        "RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog "
        "AS $$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = p_user $$")
    await env.admin.execute(
        f'REVOKE ALL ON FUNCTION "{env.schema}".pgbouncer_secret(text) FROM PUBLIC; '
        f'GRANT USAGE ON SCHEMA "{env.schema}" TO "{auth_user}"; '
        f'GRANT EXECUTE ON FUNCTION "{env.schema}".pgbouncer_secret(text) TO "{auth_user}"')
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="hotmesh-pgbouncer-"))
    bouncer = PgBouncer(port, env.server.database, directory / "pgbouncer.log", version_of(binary))
    process = launch(binary, directory, env, port, auth_user, auth_password)
    try:
        async def listening() -> bool:
            if process.poll() is not None:
                pytest.fail(f"PgBouncer exited ({process.returncode}): {bouncer.log.read_text(errors='replace')}")
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                return False
            await stream.aclose()
            return True

        await wait_for(listening, 10)
        yield bouncer
    finally:
        process.terminate()

        async def exited() -> bool:
            return process.poll() is not None

        try:
            await wait_for(exited, 10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            shutil.rmtree(directory, ignore_errors=True)


LISTENER_STATEMENTS = ("LISTEN ", "UNLISTEN *", "SELECT 1")
"""What a LISTEN connection's last statement may be: it listens, stops listening (a parked worker), or checks that
it is alive (``Listener``'s ``check_interval``)."""


async def sessions_come_from_pgbouncer(env: Env, bouncer: PgBouncer, role: str) -> None:
    """Every session of ``role`` is one of PgBouncer's server connections, at most ``SERVER_CONNECTIONS`` of
    them, but one: the LISTEN connection, straight to PostgreSQL."""

    async def seen() -> bool:
        sessions = await env.admin.fetch("SELECT client_port, query FROM pg_stat_activity WHERE usename = $1", role)
        ports = bouncer.server_ports(role)
        pooled = [s for s in sessions if s["client_port"] in ports]
        direct = [s for s in sessions if s["client_port"] not in ports]
        return (1 <= len(pooled) <= SERVER_CONNECTIONS and len(direct) == 1
                and direct[0]["query"].startswith(LISTENER_STATEMENTS))

    await wait_for(seen, 10)


async def test_a_worker_and_a_gateway_through_pgbouncer(env: Env, pgbouncer: PgBouncer, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    worker_role = await env.provision(STREAMS, "worker")
    caller = await env.provision(STREAMS, "caller")
    pool = await create_pool(pgbouncer.dsn(caller.role, caller.password), pooler="transaction")
    engine = Engine(pool, schema=env.schema, role=caller.role, listen_dsn=env.dsn(caller),
                    pool_dsn=pgbouncer.dsn(caller.role, caller.password), pooler="transaction", timeout=20.0,
                    recheck_interval=60.0)  # no timer: a call is answered only if its NOTIFY was heard
    with WorkerProcs(tmp_path, TOOLS) as workers:
        # the real CLI; --user and --password are the only login: the LISTEN DSN gets them too
        worker = workers.start(pgbouncer.base_dsn, env.schema, "--user", worker_role.role, "--listen-dsn",
                               env.server.base_dsn, "--pooler", "transaction", *QUIET,
                               HOTMESH_WORKER_PASSWORD=worker_role.password)
        try:
            async with engine, Client(McpGateway(engine).server) as client:

                async def live() -> bool:
                    await engine.refresh()
                    return {r.name for r in engine.tools() if r.live_workers} == {"pooled_echo", "pooled_block"}

                await wait_for(live, 30)

                # calls are answered: 100 at once, over 2 server connections per role
                answers: dict[int, str] = {}

                async def call(i: int) -> None:
                    result = await client.call_tool("pooled_echo", {"text": f"hello {i}"})
                    assert not result.is_error, text_of(result)
                    answers[i] = str((result.structured_content or {}).get("text"))

                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        for i in range(100):
                            tg.start_soon(call, i)
                assert answers == {i: f"hello {i}" for i in range(100)}

                # a cancellation reaches the handler: the gateway's cancel goes through PgBouncer, its NOTIFY
                # reaches the worker's LISTEN connection
                with anyio.move_on_after(1):
                    await client.call_tool("pooled_block", {})

                async def cancelled() -> bool:
                    return bool(workers.ran("cancelled"))

                await wait_for(cancelled, 10)
                row = await env.admin.fetchrow(
                    f'SELECT state, cancel_requested FROM "{env.schema}".messages WHERE stream = $1', "pooled.block")
                assert row is not None and row["cancel_requested"]

                await sessions_come_from_pgbouncer(env, pgbouncer, worker_role.role)
                await sessions_come_from_pgbouncer(env, pgbouncer, caller.role)
            assert worker.poll() is None, workers.logs()
        finally:
            await pool.close()
    # nothing failed on the way, not even once and then retried (a prepared statement PgBouncer lost, say)
    assert not [line for line in workers.logs().splitlines() if " WARNING " in line or " ERROR " in line]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_serve_with_an_admin_dsn_through_pgbouncer(env: Env, pgbouncer: PgBouncer) -> None:
    # --dsn: the admin's login at PgBouncer, the base of the roles' logins; --listen-dsn: PostgreSQL itself, where
    # the admin's own work (migrate, the lock that picks role names) and LISTEN go
    admin = dsn_user(env.server.admin_dsn)
    assert admin is not None
    options = ServeOptions(dsn=pgbouncer.dsn(admin), listen_dsn=env.server.admin_dsn, pooler="transaction",
                           schema=env.schema, timeout=20.0)
    async with running_gateway(options) as engine, Client(McpGateway(engine).server) as client:
        answers: dict[int, object] = {}

        async def call(i: int) -> None:
            result = await client.call_tool("echo", {"text": f"hello {i}"})
            answers[i] = result.structured_content

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(call, i)
        assert answers == {i: {"text": f"hello {i}", "length": len(f"hello {i}")} for i in range(20)}
        await sessions_come_from_pgbouncer(env, pgbouncer, f"{env.schema}_c_gateway")
        await sessions_come_from_pgbouncer(env, pgbouncer, f"{env.schema}_w_gateway")


async def test_an_identity_gateways_role_engines_go_the_same_way(env: Env, pgbouncer: PgBouncer) -> None:
    # the engine serve --identity-config makes for an identity's caller role: its pool through PgBouncer, its
    # LISTEN connection straight to PostgreSQL, as the gateway's own
    gateway, identity = await env.provision(STREAMS, "caller"), await env.provision(STREAMS, "caller")
    pool = await create_pool(pgbouncer.dsn(gateway.role, gateway.password), pooler="transaction")
    engine = Engine(pool, schema=env.schema, role=gateway.role, listen_dsn=env.dsn(gateway),
                    pool_dsn=pgbouncer.dsn(gateway.role, gateway.password), pooler="transaction")
    engines = RoleEngines(engine, engine.dsn, {identity.role: SecretStr(identity.password)})
    try:
        async with engine, anyio.create_task_group() as tg:
            await tg.start(engines.run)
            async with engines.use(identity.role) as acting:
                assert acting.pooler == "transaction" and acting.listener.connected.is_set()
                await acting.refresh()
                await sessions_come_from_pgbouncer(env, pgbouncer, identity.role)
            tg.cancel_scope.cancel()
    finally:
        await pool.close()


async def test_statements_stand_alone_behind_a_transaction_pooler(env: Env, pgbouncer: PgBouncer) -> None:
    # Eight connections, two server connections: each transaction may run on either. A statement asyncpg prepared
    # under a name on one is unknown on the other; with pooler="transaction" none is named.
    role = await env.provision(STREAMS, "caller")

    async def failures(pooler: Pooler | None) -> int:
        pool = await create_pool(pgbouncer.dsn(role.role, role.password), min_size=8, max_size=8, pooler=pooler)
        failed = 0

        async def statement(i: int) -> None:
            nonlocal failed
            try:
                assert await pool.fetchval("SELECT $1::int + 1", i) == i + 1
            except asyncpg.InvalidSQLStatementNameError:  # prepared statement "__asyncpg_stmt_..." does not exist
                failed += 1

        try:
            for _ in range(5):
                async with anyio.create_task_group() as tg:
                    for i in range(100):
                        tg.start_soon(statement, i)
        finally:
            await pool.close()
        return failed

    assert await failures("transaction") == 0
    if pgbouncer.version < (1, 21):  # PgBouncer keeps no prepared statement before 1.21 (max_prepared_statements)
        assert await failures(None) > 0


async def test_a_login_pgbouncer_refuses_is_a_refused_login(env: Env, pgbouncer: PgBouncer) -> None:
    # PgBouncer refuses a wrong password as a protocol violation (08P01), not as PostgreSQL's 28P01: still the
    # refused login a worker stops on, not a database error it retries
    role = await env.provision(STREAMS, "worker")
    with pytest.raises(LoginRefused, match="pooler refused the login"):
        await create_pool(pgbouncer.dsn(role.role, "not-its-password"), pooler="transaction")


async def test_a_transaction_pooler_needs_a_listen_dsn() -> None:
    # LISTEN through a transaction pooler would not hear its own notifications: refused before anything connects
    pooled = "postgresql://hotmesh_w:secret@pgbouncer.internal:6432/app"
    with pytest.raises(ConfigError, match="LISTEN needs a session of its own"):
        Worker.from_toolset(GATEWAY_TOOLS, connection=pooled, pooler="transaction")
    with pytest.raises(ConfigError, match="LISTEN needs a session of its own"):
        async with running_gateway(ServeOptions(dsn=pooled, pooler="transaction")):
            pass


async def test_a_revoked_worker_behind_pgbouncer_stops(env: Env, pgbouncer: PgBouncer) -> None:
    tools = ToolSet()

    @tools.tool(topic="pooled.echo", name="pooled_echo")
    async def echo(text: str) -> dict[str, str]:
        """Return the text."""
        return {"text": text}

    role = await env.provision(["pooled.echo"], "worker")
    async with Worker.from_toolset(tools, connection=pgbouncer.dsn(role.role, role.password), schema=env.schema,
                                   listen_dsn=env.dsn(role), pooler="transaction", poll_interval=60.0,
                                   shutdown_grace=0.5) as worker:
        await revoke(env.admin, role.role, schema=env.schema)
        # PgBouncer keeps its server connections and makes statements wait (query_wait_timeout, 120 s); the
        # LISTEN connection, straight to PostgreSQL, is refused at its next login: after the grace the worker stops
        with anyio.fail_after(LOGIN_GRACE + 20):
            await worker.failed.wait()
        assert isinstance(worker.error, LoginRefused)
