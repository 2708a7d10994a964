"""Testing your tools: serve a tool set through the real queue to an MCP client, or run one handler alone.

The pytest plugin (installed with the package, loaded by pytest on its own) gives two fixtures:

* ``hotmesh_postgres`` (session): a PostgreSQL for the tests, the embedded one in a temporary directory or the
  server ``HOTMESH_TEST_DSN`` names (a superuser's DSN); started the first time a test asks for it;
* ``hotmesh_serve`` (each test): ``served = await hotmesh_serve(toolset)`` serves a ``ToolSet`` (or
  ``"module:attr"``, ``"path/to/tools.py:attr"``) as ``mcp-hotmesh serve`` would: a fresh schema, migrated; a
  worker role and a caller role scoped to the tool set's topics; a secured worker logged in as the worker role;
  the gateway logged in as the caller role; and a connected ``mcp`` client (``mode="legacy"`` for the
  handshake-era protocol). Everything is torn down, the schema and roles dropped, when the test ends.

What a test asserts, each failing with a message that says what happened instead:

* ``structured(result)``: the structured result of a call that succeeded;
* ``error_text(result)``: the text the model reads from a call that failed;
* ``served.progress``: the progress reports that reached the client;
* ``await served.dead_letters()``: the messages the worker gave up on.

``await invoke(toolset, "name", {...})`` runs one handler in-process, without a database: the arguments are
checked and the result dumped as the worker does, and the progress it reports is recorded.

Async tests run on anyio's pytest plugin, which comes with the package: a test that uses ``hotmesh_serve`` needs
no marker; other async tests take ``@pytest.mark.anyio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import anyio
import asyncpg
from mcp import Client, MCPError
from mcp.types import CallToolResult
from pydantic import SecretStr

from . import _embedded as embedded
from ._admin import DlqFilter, dlq_list
from ._approvals import approve_toolset
from ._caller import Engine
from ._common import JSON
from ._config import RetryPolicy, WorkerCredentials
from ._mcp_server import McpGateway
from ._migrate import migrate
from ._postgres import connect, create_pool, translated
from ._roles import provision_role
from ._tools import Tool, ToolContext, ToolSet, load_toolset
from ._worker import Worker

__all__ = [
    "DeadLetter",
    "Invoked",
    "Mode",
    "Postgres",
    "Progress",
    "ServeTools",
    "ServedTools",
    "error_text",
    "invoke",
    "start_postgres",
    "structured",
]

Mode = Literal["auto", "legacy"]
"""The client's protocol era, as ``mcp.Client`` takes it: ``auto`` speaks the newest (2026-07-28), ``legacy``
the handshake era (2025-11-25) that most hosts shipping today speak."""

QUICK_RETRY = RetryPolicy(initial_interval=20, maximum_interval=100)
"""Served tools keep the default three attempts, milliseconds apart: a failing tool's test ends in a fraction of a
second instead of 1.5 s (pass ``retry=`` to test your own policy)."""


# ------------------------------------------------------------------------------------------ the database
@dataclass
class Postgres:
    """The tests' PostgreSQL: an admin's DSN, and the TCP address where roles log in with their passwords."""

    admin_dsn: str
    host: str
    port: int
    database: str
    _server: embedded.EmbeddedServer | None = field(default=None, repr=False)
    _root: Path | None = field(default=None, repr=False)

    @property
    def base_dsn(self) -> str:
        """The server's TCP address without a login, as a worker on another machine is given it."""
        return f"postgresql://{self.host}:{self.port}/{self.database}"

    def role_dsn(self, role: str, password: str) -> str:
        """A TCP DSN for a role, as a worker on another machine would use."""
        return f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{self.database}"

    def stop(self) -> None:
        """Stop the embedded server this started and remove its directory (nothing for a given DSN)."""
        if self._server is not None:
            self._server.stop()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def start_postgres() -> Postgres:
    """``HOTMESH_TEST_DSN`` (a superuser's DSN) if it is set; otherwise the embedded PostgreSQL, started in a new
    temporary directory on a free port. Roles log in over TCP with scram-sha-256 passwords either way."""
    dsn = os.environ.get("HOTMESH_TEST_DSN")
    if dsn:
        parts = urlsplit(dsn)
        return Postgres(dsn, parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.lstrip("/") or "postgres")
    root = Path(tempfile.mkdtemp(prefix="hotmesh-test-"))
    root.chmod(0o755)  # as root the server runs as its own OS user, which must reach its data directory
    try:
        server = embedded.start(root / "data")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return Postgres(server.admin_dsn, "127.0.0.1", server.port, embedded.DATABASE, server, root)


async def _drop(admin: asyncpg.Connection, schema: str) -> None:
    """Remove a schema and every role made for it (``<schema>_...``), ending their sessions first."""
    with translated():
        roles = [r["rolname"] for r in await admin.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE $1 ESCAPE '\\'", schema.replace("_", "\\_") + "\\_%")]
        await admin.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE usename = ANY($1::text[])", roles)
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for role in roles:
            await admin.execute(f'DROP OWNED BY "{role}" CASCADE')
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')


# --------------------------------------------------------------------------------------- what tests read
@dataclass(frozen=True)
class Progress:
    """One progress report, as the handler sent it (``ctx.report_progress``) and the agent received it."""

    progress: float
    total: float | None = None
    message: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A message the worker gave up on: its attempts were used up, its deadline passed, or it was cancelled."""

    tool: str
    arguments: Any
    error: str | None
    attempts: int  # how many times the handler ran (3 after the default policy's three failures)


def _text(result: CallToolResult) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def structured(result: CallToolResult) -> dict[str, Any]:
    """The structured result of a call that succeeded; a failed call is an ``AssertionError`` saying why."""
    __tracebackhide__ = True
    if result.is_error:
        raise AssertionError(f"the tool call failed: {_text(result)}")
    if result.structured_content is None:
        raise AssertionError(f"the tool call returned no structured result, only: {_text(result)!r}")
    return dict(result.structured_content)


def error_text(result: CallToolResult) -> str:
    """The text the model reads from a call that failed; a call that succeeded is an ``AssertionError``."""
    __tracebackhide__ = True
    if not result.is_error:
        raise AssertionError(f"the tool call succeeded, expected a failure; it returned {result.structured_content!r}")
    return _text(result)


# ------------------------------------------------------------------------------- a tool set, served
@dataclass
class ServedTools:
    """A tool set served through the real queue, and ``client``, the ``mcp.Client`` connected to its gateway."""

    client: Client
    schema: str
    tools: ToolSet
    progress: list[Progress] = field(default_factory=list)
    """The progress reports that reached the client in calls through ``call_tool``, in order (reports that
    follow each other closely may arrive merged: the client then gets the latest)."""
    _admin: asyncpg.Connection | None = field(default=None, repr=False)
    _admin_lock: anyio.Lock = field(default_factory=anyio.Lock, repr=False)

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> CallToolResult:
        """Call a tool as an agent does (``client.call_tool``), recording its progress in ``progress``. What the
        protocol refuses (an unknown tool) raises ``mcp.MCPError``, as it does for an agent."""
        __tracebackhide__ = True

        async def record(progress: float, total: float | None, message: str | None) -> None:
            self.progress.append(Progress(progress, total, message))

        try:
            return await self.client.call_tool(name, arguments, progress_callback=record)
        except MCPError as exc:  # the test's own mistake: shown at the test's line, not in the SDK's frames
            raise exc.with_traceback(None) from None

    async def dead_letters(self) -> list[DeadLetter]:
        """The messages the worker gave up on (``mcp-hotmesh dlq``), oldest first."""
        assert self._admin is not None
        async with self._admin_lock:  # one statement at a time on the admin's connection
            dead = await dlq_list(self._admin, self.schema, DlqFilter())
        names = {(t.topic, t.workflow_name): t.name for t in self.tools.tools}
        return [DeadLetter(names.get((d.stream, d.workflow_name), d.stream), d.args, d.error, d.attempt)
                for d in sorted(dead, key=lambda d: d.id)]


@contextlib.asynccontextmanager
async def serving(postgres: Postgres, tools: ToolSet | str, *, mode: Mode = "auto",
                  retry: RetryPolicy | None = None, call_timeout: float = 30.0) -> AsyncIterator[ServedTools]:
    """``tools`` served as ``mcp-hotmesh serve`` serves them, in a fresh schema dropped on exit (see the module)."""
    toolset = load_toolset(tools) if isinstance(tools, str) else tools
    if not toolset.tools:
        raise AssertionError("the tool set has no tools")
    streams = list(toolset.topics)
    schema = "t_" + secrets.token_hex(6)
    async with contextlib.AsyncExitStack() as stack:
        admin = await connect(postgres.admin_dsn)
        stack.push_async_callback(admin.close)
        stack.push_async_callback(_drop, admin, schema)  # after everything logged in as its roles has closed
        await migrate(admin, schema)
        worker = await provision_role(admin, streams, "worker", schema=schema)
        caller = await provision_role(admin, streams, "caller", schema=schema)
        await approve_toolset(admin, schema, toolset)  # as `serve` does for the tool set it runs itself
        credentials = WorkerCredentials(user=worker.role, password=SecretStr(worker.password))
        # the worker's stop waits for running handlers at most a second: a test's hung handler ends the test fast
        await stack.enter_async_context(Worker.from_toolset(
            toolset, connection=postgres.base_dsn, credentials=credentials,
            schema=schema, retry=retry or QUICK_RETRY, shutdown_grace=1.0, purge_interval=0))
        caller_dsn = postgres.role_dsn(caller.role, caller.password)
        pool = await create_pool(caller_dsn, min_size=1, max_size=10)
        stack.push_async_callback(pool.close)
        engine = await stack.enter_async_context(
            Engine(pool, schema=schema, role=caller.role, listen_dsn=caller_dsn, timeout=call_timeout))
        await _until_live(engine, toolset)
        client = await stack.enter_async_context(Client(McpGateway(engine).server, mode=mode))
        yield ServedTools(client, schema, toolset, _admin=admin)


async def _until_live(engine: Engine, toolset: ToolSet, seconds: float = 10.0) -> None:
    """The worker registers its tools before it starts: they are in the catalog with a live worker at once, unless
    the machine is very busy (then this waits a little)."""
    wanted = {t.name for t in toolset.tools}
    with anyio.move_on_after(seconds):
        while not wanted <= {r.name for r in engine.tools() if r.live_workers}:
            await anyio.sleep(0.05)
            await engine.refresh()
        return
    missing = sorted(wanted - {r.name for r in engine.tools() if r.live_workers})
    raise AssertionError(f"the worker did not register tools {missing} within {seconds:.0f} s")


class ServeTools(Protocol):
    """The ``hotmesh_serve`` fixture's type, for annotated tests: ``hotmesh_serve: ServeTools``."""

    async def __call__(self, tools: ToolSet | str, *, mode: Mode = "auto", retry: RetryPolicy | None = None,
                       call_timeout: float = 30.0) -> ServedTools: ...


class Servers:
    """What ``hotmesh_serve`` hands out: each tool set is served in a task of its own, so the test's own task
    holds none of the serving's cancel scopes (a test may end anywhere); ``close`` tears them all down."""

    def __init__(self, postgres: Postgres) -> None:
        self.postgres = postgres
        self._running: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    async def serve(self, tools: ToolSet | str, *, mode: Mode = "auto", retry: RetryPolicy | None = None,
                    call_timeout: float = 30.0) -> ServedTools:
        ready: asyncio.Future[ServedTools] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()

        async def run() -> None:
            try:
                async with serving(self.postgres, tools, mode=mode, retry=retry,
                                   call_timeout=call_timeout) as served:
                    if not ready.done():  # (done: the test stopped waiting, it was cancelled)
                        ready.set_result(served)
                    await stop.wait()
            except BaseException as exc:
                if ready.done():
                    raise
                ready.set_exception(exc)

        self._running.append((asyncio.create_task(run()), stop))
        return await ready

    async def close(self) -> None:
        """Tear down every tool set served, the last first; the first failure (after all are down) is raised."""
        failures: list[BaseException] = []
        while self._running:
            task, stop = self._running.pop()
            stop.set()
            try:
                await task
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


# ------------------------------------------------------------------------------------- no database at all
@dataclass(frozen=True)
class Invoked:
    """What one handler returned (as JSON, as the worker publishes it) and the progress it reported."""

    result: JSON
    progress: list[Progress]


def _tool(tools: ToolSet | Tool, name: str) -> Tool:
    __tracebackhide__ = True
    if isinstance(tools, Tool):
        return tools
    for tool in tools.tools:
        if tool.name == name:
            return tool
    raise AssertionError(f"no tool named {name!r} in the tool set; it has {sorted(t.name for t in tools.tools)}")


async def invoke(tools: ToolSet | Tool, name: str = "", arguments: dict[str, Any] | None = None, *,
                 attempt: int = 0) -> Invoked:
    """Run the handler of tool ``name`` in this process, as the worker would: the arguments checked against its
    input model (``ToolInputError`` if they do not fit), the result against its output type (``ToolOutputError``),
    with a ``ToolContext`` whose progress is recorded. Whatever the handler raises is raised here, unchanged."""
    tool = _tool(tools, name)
    reports: list[Progress] = []

    async def record(progress: float, total: float | None, message: str | None) -> None:
        reports.append(Progress(progress, total, message))

    ctx = ToolContext(attempt=attempt, progress=record, workflow_name=tool.workflow_name, topic=tool.topic)
    result = await tool.invoke(arguments if arguments is not None else {}, ctx)
    return Invoked(result, reports)
