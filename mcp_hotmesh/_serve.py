"""``mcp-hotmesh serve``: where the database is, which roles to log in as, the attached worker, the transport.

Three modes, chosen by the DSN (``--dsn`` / ``HOTMESH_DSN``):

* no DSN: the embedded PostgreSQL is started (``--data-dir``), then as with an admin DSN;
* an admin DSN (a superuser, a member of ``<schema>_owner``, or before the schema exists a role with
  CREATEROLE, as on a managed PostgreSQL): migrate, then create or take over (with a fresh password,
  ``roles.ensure_role``) a caller role ``<schema>_c_gateway`` and, unless ``--no-worker``, a worker role
  ``<schema>_w_gateway``, both scoped to the tool set's topics. The admin connection is closed
  once they exist: agents are served through the caller role's pool and the attached worker runs through the
  worker role's pool, each logged in with its own password, as a process on another machine would be;
* any other DSN: a caller role's login. The gateway only serves (workers run elsewhere).

Behind a transaction pooler (``--pooler transaction``) the DSN names the pooler and ``--listen-dsn`` PostgreSQL
itself (or a session-mode pool), with the same login: the pools go through the pooler, LISTEN and, with an admin
DSN, the admin's work (migrate, the advisory lock below) go to ``--listen-dsn``, as they need a session.

A second ``serve`` on the same schema must not take over the roles of a first one that is still running (a
new password would lock the first one out of new connections), so a role already logged in is skipped for
``<schema>_c_gateway_2``, ``_3``, ... under an advisory lock.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import asyncpg
from pydantic import SecretStr

from . import _approvals as approvals
from . import _embedded as embedded
from ._caller import Engine
from ._config import DEFAULT_SCHEMA, Pooler, WorkerCredentials, check_pooler, check_schema, connection_dsn
from ._housekeeping import retention_loop, watchdog_loop
from ._http import check_http_token, check_port_free, run_http, transport_security
from ._identity import load_config
from ._identity_gateway import IdentityGateway
from ._mcp_server import McpGateway
from ._migrate import migrate
from ._postgres import connect, create_pool, translated
from ._roles import ensure_role
from ._stdio import protocol_stdout, run_stdio
from ._tools import ToolSet, load_toolset
from .errors import ConfigError, Conflict, HotMeshError, PermissionDenied

log = logging.getLogger(__name__)

MAX_INSTANCES = 20


@dataclass(frozen=True)
class ServeOptions:
    """What ``serve`` runs, as the CLI's flags give it (each field is the flag of the same name)."""

    tools: str = "mcp_hotmesh.examples:toolset"  # MODULE:ATTR or path/file.py:ATTR
    dsn: str | None = None  # none: the embedded server in data_dir
    listen_dsn: str | None = None  # LISTEN (and an admin's work) when dsn goes through a transaction pooler
    pooler: Pooler | None = None  # "transaction": dsn goes through a pooler in transaction mode
    data_dir: Path | None = None
    schema: str = DEFAULT_SCHEMA
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # required with http
    no_worker: bool = False  # serve only; workers run elsewhere
    timeout: float = 60.0  # seconds a call may take
    max_args_bytes: int = 1 << 20
    purge_interval: float = 60.0  # seconds between retention purges; 0: none
    identity_config: Path | None = None  # with http: serve identities as their own caller roles
    allowed_hosts: tuple[str, ...] = ()  # names clients reach the HTTP server by (DNS-rebinding protection)
    keepalive: float = 15.0  # seconds a call may be quiet before a client that asked for progress hears from it


async def is_admin(conn: asyncpg.Connection, schema: str) -> bool:
    """A superuser, or a member of ``<schema>_owner``; before the schema exists, a role that may create it (with
    CREATEROLE, as a managed PostgreSQL's admin: ``migrate`` makes the owner and grants it to that role)."""
    with translated():
        row = await conn.fetchrow(
            "SELECT r.rolsuper, r.rolcreaterole, EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS owner_exists "
            "FROM pg_roles r WHERE r.rolname = session_user",
            f"{schema}_owner",
        )
        if row is None:
            return False
        if row["rolsuper"]:
            return True
        if not row["owner_exists"]:
            return bool(row["rolcreaterole"])
        return bool(await conn.fetchval("SELECT pg_has_role(session_user, $1, 'MEMBER')", f"{schema}_owner"))


async def _serve_lock(conn: asyncpg.Connection, schema: str, seconds: float = 10.0) -> None:
    """One start at a time picks role names. Any role can take an advisory lock, so a stranger holding this one
    delays a start by ``seconds`` at most; the start then goes on unlocked."""
    with anyio.move_on_after(seconds), translated():
        key = f"mcp-hotmesh:serve:{schema}"
        while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):  # noqa: ASYNC110
            # polled: a blocking pg_advisory_lock would wait for ever on a stranger
            await anyio.sleep(0.1)
        return
    log.warning("another process holds the serve lock of schema %s; going on without it", schema)


async def _free_suffix(conn: asyncpg.Connection, schema: str, with_worker: bool) -> str:
    """``""`` or ``_2``, ``_3``...: the first pair of gateway role names that no running process is logged in as."""
    for i in range(1, MAX_INSTANCES + 1):
        suffix = "" if i == 1 else f"_{i}"
        names = [f"{schema}_c_gateway{suffix}"] + ([f"{schema}_w_gateway{suffix}"] if with_worker else [])
        with translated():
            busy = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1::text[])", names)
        if not busy:
            return suffix
    raise Conflict(f"{MAX_INSTANCES} gateways already run on schema {schema!r}")


@contextlib.asynccontextmanager
async def _attached_worker(
    toolset: ToolSet, dsn: str, credentials: WorkerCredentials, schema: str, *, listen_dsn: str | None,
    pooler: Pooler | None,
) -> AsyncIterator[None]:
    from ._worker import Worker  # the worker runtime

    # the gateway's own retention loop purges these streams already (its caller role may)
    async with Worker.from_toolset(toolset, connection=dsn, credentials=credentials, schema=schema, purge_interval=0,
                                   listen_dsn=listen_dsn, pooler=pooler):
        yield


async def _stop_embedded(server: embedded.EmbeddedServer) -> None:
    """Stop the embedded server this process started, unless another process (a second ``serve`` that joined
    it, a worker, a ``psql``) is still connected: it then keeps running, and the next start joins it."""
    try:
        conn = await connect(server.admin_dsn)
        try:
            others = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
    except HotMeshError:
        others = 0
    if others:
        log.info("leaving the embedded PostgreSQL running: %d other connection(s) use it", others)
        return
    await anyio.to_thread.run_sync(server.stop)


@contextlib.asynccontextmanager
async def running_gateway(args: ServeOptions) -> AsyncIterator[Engine]:
    """Everything ``serve`` runs before it speaks MCP; yields the engine, tears it all down on exit."""
    schema = check_schema(args.schema)
    timeout = float(args.timeout)
    max_args = int(args.max_args_bytes)
    if timeout <= 0 or max_args <= 0:
        raise ConfigError("--timeout and --max-args-bytes must be positive")
    if args.listen_dsn and not args.dsn:
        raise ConfigError("--listen-dsn goes with --dsn: the embedded server is reached directly")
    pooler = check_pooler(args.pooler, args.listen_dsn)
    async with contextlib.AsyncExitStack() as stack:
        server: embedded.EmbeddedServer | None = None
        dsn = args.dsn
        if not dsn:
            server = await anyio.to_thread.run_sync(lambda: embedded.start(args.data_dir))
            if server.started_here:
                stack.push_async_callback(_stop_embedded, server)
            dsn = server.admin_dsn
        worker_dsn: str | None = None
        worker_credentials: WorkerCredentials | None = None
        toolset: ToolSet | None = None
        admin = await connect(args.listen_dsn or dsn)  # a session: the admin's work takes session locks
        try:
            if await is_admin(admin, schema):
                toolset = load_toolset(args.tools)
                streams = list(toolset.topics)
                if not streams:
                    raise ConfigError(f"the tool set {args.tools} has no tools")
                await migrate(admin, schema)
                await _serve_lock(admin, schema)
                suffix = await _free_suffix(admin, schema, not args.no_worker)
                caller = await ensure_role(admin, f"{schema}_c_gateway{suffix}", streams, "caller", schema=schema)
                # Each role logs in with its own password: over TCP to the embedded server, as from another
                # machine; otherwise the admin DSN's host, port and database with the role's login.
                base = server.role_dsn(caller.role, caller.password) if server is not None else dsn
                caller_login = WorkerCredentials(user=caller.role, password=SecretStr(caller.password))
                caller_dsn = connection_dsn(base, caller_login)
                listen_dsn = connection_dsn(args.listen_dsn or base, caller_login)
                if not args.no_worker:
                    worker = await ensure_role(admin, f"{schema}_w_gateway{suffix}", streams, "worker", schema=schema)
                    # The admin runs this tool set's code itself: its definitions are approved as they are
                    # (a worker elsewhere that registers another definition still waits for `tools approve`).
                    await approvals.approve_toolset(admin, schema, toolset)
                    worker_credentials = WorkerCredentials(user=worker.role, password=SecretStr(worker.password))
                    worker_dsn = connection_dsn(base, worker_credentials)
                log.info("serving as caller role %s%s", caller.role,
                         f" with an attached worker as {worker_credentials.user}" if worker_credentials else "")
                # logged in: the names are now busy
                pool = await create_pool(caller_dsn, min_size=1, max_size=10, pooler=pooler)
            else:
                caller_dsn, listen_dsn = dsn, args.listen_dsn or dsn
                pool = await create_pool(caller_dsn, min_size=1, max_size=10, pooler=pooler)
        finally:
            await admin.close()  # the admin's part ends here (and the advisory lock with it)
        stack.push_async_callback(pool.close)
        with translated():
            role = str(await pool.fetchval("SELECT session_user"))
        if toolset is not None and worker_dsn is not None and worker_credentials is not None:
            # the attached worker first: its tools are registered and live before the first tools/list
            await stack.enter_async_context(_attached_worker(toolset, worker_dsn, worker_credentials, schema,
                                                             listen_dsn=args.listen_dsn, pooler=pooler))
        engine = Engine(pool, schema=schema, role=role, listen_dsn=listen_dsn, pool_dsn=caller_dsn, pooler=pooler,
                        timeout=timeout, max_args_bytes=max_args)
        try:
            await stack.enter_async_context(engine)
        except PermissionDenied:
            raise ConfigError(
                f"this DSN's role can neither administer schema {schema!r} nor call its tools: give an admin DSN "
                "or a caller role's (mcp-hotmesh provision --kind caller)"
            ) from None
        if toolset is None:
            log.info("serving as %s; workers run elsewhere", role)
        yield engine


async def serve(args: ServeOptions) -> None:
    """``mcp-hotmesh serve``: start the gateway (``running_gateway``) and serve the chosen transport."""
    if not args.keepalive > 0:
        raise ConfigError("--keepalive must be a positive number of seconds")
    identities = None
    if args.identity_config is not None:
        if args.transport != "http":
            raise ConfigError("--identity-config needs --transport http: identities are bearer tokens")
        identities = load_config(args.identity_config)
    if args.transport == "http":
        if identities is None or args.token:
            check_http_token(args.host, args.token)  # refuse before starting anything
        transport_security(args.host, args.allowed_hosts)
        check_port_free(args.host, args.port)
    stop = anyio.Event()
    with contextlib.ExitStack() as outputs:
        wire = outputs.enter_context(protocol_stdout()) if args.transport == "stdio" else None
        async with running_gateway(args) as engine, anyio.create_task_group() as tg:
            gateway = McpGateway(engine, keepalive=args.keepalive) if identities is None else await tg.start(
                IdentityGateway(engine, identities, keepalive=args.keepalive).run)

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("received %s; stopping", signal.Signals(signum).name)
                        stop.set()
                        if args.transport != "http":
                            tg.cancel_scope.cancel()

            tg.start_soon(on_signal)
            # retention: this process purges the finished calls of its streams now and then (bounded, locked)
            tg.start_soon(lambda: retention_loop(engine.api, interval=args.purge_interval))
            tg.start_soon(lambda: watchdog_loop(engine.api))
            if args.transport == "http":
                await run_http(gateway, host=args.host, port=args.port, token=args.token, stop=stop,
                               allowed_hosts=args.allowed_hosts)
            else:
                await run_stdio(gateway, wire)
            tg.cancel_scope.cancel()
