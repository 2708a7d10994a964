"""What the test modules share: plain classes and functions (the fixtures are in ``conftest.py``).

A test module imports from here and from ``conftest`` only, never from another ``test_*.py``.

- the server and a test's schema: ``PgServer``, ``Env``, ``drop_schema``
- waiting: ``wait_for`` (a predicate), ``finished`` (a call's result)
- an in-process worker: ``serving`` (a fresh role for a tool set), ``run_worker`` (a given role), ``FAST``
  (short intervals), ``QUICK_RETRY`` (retries milliseconds apart)
- a gateway with a worker behind it: ``hub_for`` and its ``Hub``, serving ``GATEWAY_TOOLS`` by default (the
  ``http_hub`` fixture puts it on HTTP)
- HTTP: ``http_server``, ``http_client``, ``TOKEN``, ``free_port``
- the real CLI: ``cli_command``, ``run_cli``, ``ok``, ``one_line_error``, ``clean_environ``, ``stop_if_left_running``
- ``mcp-hotmesh worker`` processes: ``WorkerProcs``
- results: ``text_of``
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict
from uuid import UUID

import anyio
import asyncpg
import httpx2
from mcp import Client
from mcp.types import CallToolResult
from pydantic import SecretStr
from typing_extensions import Unpack

from mcp_hotmesh import _embedded as embedded
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._common import Kind
from mcp_hotmesh._config import RetryPolicy, WorkerCredentials, connection_dsn
from mcp_hotmesh._http import run_http
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._roles import ProvisionedRole, provision_role
from mcp_hotmesh._streams import CallerAPI, CallResult, WorkerAPI
from mcp_hotmesh._tools import ToolContext, ToolSet
from mcp_hotmesh._worker import Worker
from mcp_hotmesh.examples import toolset as example_tools

ROOT = Path(__file__).resolve().parents[1]
"""The repository's checkout: the working directory of every command a test runs."""


# ------------------------------------------------------------------------------- the server and a schema
@dataclass
class PgServer:
    admin_dsn: str
    tcp_host: str
    tcp_port: int
    database: str
    embedded: embedded.EmbeddedServer | None = None

    @property
    def base_dsn(self) -> str:
        """The server's TCP address without a login, as a worker on another machine is given it."""
        return f"postgresql://{self.tcp_host}:{self.tcp_port}/{self.database}"

    def role_dsn(self, role: str, password: str) -> str:
        """A TCP DSN for a role, as a worker on another machine would use."""
        return connection_dsn(self.base_dsn, WorkerCredentials(user=role, password=SecretStr(password)))


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

    async def pool(self, role: ProvisionedRole | None = None, *, min_size: int = 1,
                   max_size: int = 10) -> asyncpg.Pool:
        """A pool logged in as ``role`` (the admin without one); terminated at the end of the test."""
        dsn = self.dsn(role) if role else self.server.admin_dsn
        pool = await create_pool(dsn, min_size=min_size, max_size=max_size)
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

    @contextlib.asynccontextmanager
    async def session(self, role: ProvisionedRole) -> AsyncIterator[asyncpg.Connection]:
        """A raw session of ``role`` over TCP with its password (an attacker's own client); terminated at the end
        whatever happened to it, on the server too: whatever it held is let go before the test goes on."""
        conn = await self.connect(role)
        pid = conn.get_server_pid()
        try:
            yield conn
        finally:
            conn.terminate()
            # (the server notices a closed client only when it next reads; pg_terminate_backend waits for the end)
            await self.admin.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE pid = $1", pid)

    async def set(self, key: str, value: int) -> None:
        """Change an admin setting (lease bounds, size limits) in this test's schema."""
        await self.admin.execute(f'UPDATE "{self.schema}".settings SET value = $2 WHERE key = $1', key, value)

    async def message(self, id: int) -> asyncpg.Record:
        row = await self.admin.fetchrow(f'SELECT * FROM "{self.schema}".messages WHERE id = $1', id)
        assert row is not None
        return row

    async def call_row(self, call_id: UUID) -> asyncpg.Record:
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


# ------------------------------------------------------------------------------------------------ waiting
async def wait_for(predicate: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    """Until ``predicate()`` is true, asked every 20 ms; fails after ``seconds`` (generous: a busy machine).

    For state with no event to wait on: the database, a process, a file."""
    with anyio.fail_after(seconds):
        while not await predicate():  # noqa: ASYNC110 - polling what has no event to await
            await anyio.sleep(0.02)


async def finished(caller: CallerAPI, call_id: UUID, seconds: float = 10) -> CallResult:
    """The call's result once it is done or dead (polled: the gateway, not the test, listens)."""
    with anyio.fail_after(seconds):
        while not (result := await caller.result(call_id)).finished:  # noqa: ASYNC110 - a row, not an event
            await anyio.sleep(0.02)
    return result


def text_of(result: CallToolResult) -> str:
    """The text an agent reads in a tool's result."""
    return "".join(getattr(c, "text", "") for c in result.content)


# -------------------------------------------------------------------------------------- in-process workers
class RuntimeOptions(TypedDict, total=False):
    """What ``Worker`` takes besides its configs, the tools and the schema."""

    concurrency: int
    poll_interval: float
    heartbeat_interval: float
    shutdown_grace: float
    purge_interval: float
    park_after: float | None
    pool_size: int


class WorkerOptions(RuntimeOptions, total=False):
    """What ``Worker.from_toolset`` takes besides the tools, the connection and the schema."""

    readonly: bool
    reclaim_delay: int
    reclaim_count: int
    retry: RetryPolicy
    task_queue: str


FAST: RuntimeOptions = {"poll_interval": 0.2, "heartbeat_interval": 1.0, "shutdown_grace": 0.5}
"""Short intervals, so that a test sees a fallback poll, a heartbeat or a stop within a second."""

QUICK_RETRY = RetryPolicy(initial_interval=20, maximum_interval=100)
"""The default three attempts, a few milliseconds apart (the default waits 0.5 s, then 1 s)."""


@contextlib.asynccontextmanager
async def serving(env: Env, tools: ToolSet, **options: Unpack[WorkerOptions]) -> AsyncIterator[Worker]:
    """A worker for ``tools``, logged in as a fresh worker role for their topics (``FAST`` unless overridden)."""
    role = await env.provision(sorted(tools.topics), "worker")
    given: WorkerOptions = {**FAST, **options}
    async with Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, **given) as worker:
        yield worker


@contextlib.asynccontextmanager
async def run_worker(env: Env, role: ProvisionedRole, toolset: ToolSet,
                     **options: Unpack[WorkerOptions]) -> AsyncIterator[Worker]:
    """The real worker runtime, logged in as ``role`` over TCP with its password (as from another machine)."""
    credentials = WorkerCredentials(user=role.role, password=SecretStr(role.password))
    given: WorkerOptions = {"shutdown_grace": 1.0, **options}
    worker = Worker.from_toolset(toolset, connection=env.server.base_dsn, credentials=credentials,
                                 schema=env.schema, **given)
    async with worker:
        yield worker


# ------------------------------------------------------------------------------------ a gateway and a worker
GATEWAY_TOOLS = ToolSet(list(example_tools.tools))
"""The example tools and two of the tests' own: ``test_fail`` (always fails) and ``test_block`` (until cancelled)."""

block_cancellations = {"count": 0}
"""How many times ``test_block`` was cancelled (in this process)."""


@GATEWAY_TOOLS.tool(topic="test.fail", name="test_fail")
async def fail(reason: str) -> dict[str, str]:
    """Always fails with the given reason."""
    raise ValueError(reason)


@GATEWAY_TOOLS.tool(topic="test.block", name="test_block")
async def block(ctx: ToolContext | None = None) -> dict[str, str]:
    """Blocks until cancelled."""
    try:
        await anyio.sleep(120)
    except anyio.get_cancelled_exc_class():
        block_cancellations["count"] += 1
        raise
    return {}


@dataclass
class Hub:
    """A gateway (its engine and in-process MCP server, logged in as ``caller``) with a real worker behind it."""

    env: Env
    engine: Engine
    gateway: McpGateway
    caller: ProvisionedRole

    async def rows(self, where: str = "true") -> int:
        """How many messages there are (``where`` is an SQL condition on them)."""
        return int(await self.env.admin.fetchval(f'SELECT count(*) FROM "{self.env.schema}".messages WHERE {where}'))

    async def unfinished(self) -> int:
        """Messages that have not ended (done, dead, cancelled or expired): after every answered call, none may be
        left."""
        return await self.rows("state NOT IN ('done', 'dead', 'cancelled', 'expired')")

    async def still_serving(self, client: Client) -> None:
        """The example ``echo`` tool still answers through ``client``."""
        result = await client.call_tool("echo", {"text": "still here"})
        assert not result.is_error and result.structured_content == {"text": "still here", "length": 10}


@contextlib.asynccontextmanager
async def hub_for(env: Env, *, toolset: ToolSet = GATEWAY_TOOLS, extra_streams: Sequence[str] = (),
                  call_timeout: float = 20.0, max_args_bytes: int = 4096, recheck_interval: float = 5.0,
                  retry: RetryPolicy = QUICK_RETRY) -> AsyncIterator[Hub]:
    """A worker serving ``toolset`` and a gateway whose caller role may use its topics and ``extra_streams``; ready
    once every tool has a live worker. ``retry`` is the worker's; the engine takes the rest (``call_timeout`` is its
    ``timeout``)."""
    worker_role = await env.provision(list(toolset.topics), "worker")
    caller = await env.provision([*toolset.topics, *extra_streams], "caller")
    engine = Engine(await env.pool(caller), schema=env.schema, role=caller.role, listen_dsn=env.dsn(caller),
                    timeout=call_timeout, max_args_bytes=max_args_bytes, recheck_interval=recheck_interval)
    async with run_worker(env, worker_role, toolset, retry=retry), engine:

        async def ready() -> bool:
            await engine.refresh()
            return {r.name for r in engine.tools() if r.live_workers} >= {t.name for t in toolset.tools}

        await wait_for(ready, 30)
        yield Hub(env, engine, McpGateway(engine), caller)


# --------------------------------------------------------------------------------------------------- HTTP
TOKEN = "test-token-0123456789-abcdef"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the ephemeral range (32768 and up).

    A port the kernel picked (bind to 0) may be handed out again as some client's own port before the test's
    server binds it; so may a server's port while it is down and clients retry 127.0.0.1:port (a TCP
    self-connect), and a restarted server could then not bind it. Ports below 32768 are never handed out."""
    for _ in range(100):
        port = random.randint(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@contextlib.asynccontextmanager
async def http_server(gateway: McpGateway) -> AsyncIterator[str]:
    """The gateway on Streamable HTTP with ``TOKEN``, on a free port; yields its base URL."""
    port = free_port()
    async with anyio.create_task_group() as tg:
        stop, started = anyio.Event(), anyio.Event()
        tg.start_soon(lambda: run_http(gateway, host="127.0.0.1", port=port, token=TOKEN, stop=stop,
                                       started=started))
        with anyio.fail_after(10):
            await started.wait()
        yield f"http://127.0.0.1:{port}"
        stop.set()


@contextlib.asynccontextmanager
async def http_gateway(env: Env, caller: ProvisionedRole, tools: ToolSet) -> AsyncIterator[str]:
    """A gateway logged in as ``caller`` on Streamable HTTP, once every tool of ``tools`` has a live worker;
    yields its base URL."""
    engine = Engine(await env.pool(caller), schema=env.schema, role=caller.role, listen_dsn=env.dsn(caller),
                    timeout=30.0, recheck_interval=1.0)
    async with engine:

        async def listed() -> bool:
            await engine.refresh()
            return len([r for r in engine.tools() if r.live_workers]) == len(tools.tools)

        await wait_for(listed, 30)
        async with http_server(McpGateway(engine)) as url:
            yield url


def http_client(token: str | None) -> httpx2.AsyncClient:
    """An HTTP client sending ``token`` as a bearer token (none: no Authorization header)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))


# ------------------------------------------------------------------------------------------------ the CLI
def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any HOTMESH_* setting (so only what a test gives counts), plus
    ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("HOTMESH_")}, **extra}


def cli_command() -> list[str]:
    """The installed console script (what a host's config names), or the module when running from a checkout."""
    script = Path(sys.executable).parent / "mcp-hotmesh"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mcp_hotmesh"]


async def run_cli(*args: str, limit: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``mcp-hotmesh ARGS`` to its end with no HOTMESH_* setting (only the arguments count), in ``limit``
    seconds at most; its output as text."""
    with anyio.fail_after(limit):
        done = await anyio.run_process([*cli_command(), *args], check=False, env=clean_environ(), cwd=ROOT)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """A command that succeeded, without a traceback."""
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def one_line_error(done: subprocess.CompletedProcess[str], command: str, code: int) -> str:
    """A failed command: exit ``code``, nothing on stdout, exactly one line on stderr, no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"mcp-hotmesh {command}: error: "), lines[0]
    assert "Traceback" not in done.stderr
    return lines[0]


def stop_if_left_running(data_dir: Path) -> None:
    """Stop the embedded server of ``data_dir`` if a command left it running."""
    running = embedded._running(data_dir.resolve())
    if running is not None:
        embedded.EmbeddedServer(running.data_dir, running.socket_dir, running.port, started_here=True).stop()


# ----------------------------------------------------------------------------------- worker processes
TOOLS_PREAMBLE = '''
from __future__ import annotations

import os
from pathlib import Path

import anyio

from mcp_hotmesh._tools import ToolSet

toolset = ToolSet()
MARKS = Path(os.environ["TEST_MARKS"])
'''


class WorkerProcs:
    """``mcp-hotmesh worker`` processes serving a tool module written for the test, each logged in with the DSN it
    is given; a context manager that kills whatever is left at the end.

    ``tools`` is the module's body, after ``TOOLS_PREAMBLE``: its handlers touch ``MARKS / "<key>-<pid>"``, so the
    test knows which process ran what without any side channel into the workers. Each process's stderr is its log;
    its stdout is kept for the test to read (it must stay empty: logs go to stderr)."""

    def __init__(self, tmp: Path, tools: str) -> None:
        self.tmp = tmp
        self.marks = tmp / "marks"
        self.marks.mkdir(exist_ok=True)
        self.tools = tmp / "worker_tools.py"
        self.tools.write_text(TOOLS_PREAMBLE + textwrap.dedent(tools))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, dsn: str, schema: str, *extra: str, **environ: str) -> subprocess.Popen[bytes]:
        """``mcp-hotmesh worker`` with ``extra`` arguments and ``environ`` added to a clean environment."""
        with open(self.log_path(len(self.procs)), "wb") as log:
            proc = subprocess.Popen(
                [*cli_command(), "worker", "--tools", f"{self.tools}:toolset", "--dsn", dsn, "--schema", schema,
                 *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
                env=clean_environ(TEST_MARKS=str(self.marks), HOTMESH_POLL_INTERVAL="0.2", **environ),
            )
        self.procs.append(proc)
        return proc

    def ran(self, prefix: str) -> dict[str, set[int]]:
        """For each mark ``<prefix>-...`` (say ``work-<n>``), the pids of the processes that made it."""
        found: dict[str, set[int]] = {}
        for mark in self.marks.glob(f"{prefix}-*"):
            key, _, pid = mark.name.rpartition("-")
            found.setdefault(key, set()).add(int(pid))
        return found

    def log_path(self, index: int) -> Path:
        """The stderr of the ``index``-th process started."""
        return self.tmp / f"worker-{index}.log"

    def logs(self) -> str:
        return "\n".join(self.log_path(i).read_text(errors="replace") for i in range(len(self.procs)))

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> WorkerProcs:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.cleanup()


# ------------------------------------------------------------------------------------- raw JSON-RPC over HTTP
LEGACY = "2025-11-25"
MODERN = "2026-07-28"


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.code = error.get("code")
        self.error = error


class Raw:
    """A JSON-RPC client over Streamable HTTP, written by hand: a 2025-11-25 session (``initialize``) or
    2026-07-28 requests (each with its ``_meta`` envelope and routing headers)."""

    def __init__(self, http: httpx2.AsyncClient, url: str, version: str) -> None:
        self.http, self.url, self.version = http, f"{url}/mcp", version
        self.session: str | None = None
        self.ids = 0

    async def open(self) -> dict[str, Any]:
        if self.version == MODERN:
            return await self.request("server/discover", {})
        result = await self.request("initialize", {
            "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}})
        await self.http.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                             headers=self._headers("notifications/initialized", {}))
        return result

    def _headers(self, method: str, params: dict[str, Any]) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": self.version}
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        if self.version == MODERN:
            headers["Mcp-Method"] = method
            name = params.get("name") or params.get("taskId")
            if name:
                headers["Mcp-Name"] = str(name)
        return headers

    async def request(self, method: str, params: dict[str, Any], *, tasks: bool = True) -> dict[str, Any]:
        self.ids += 1
        params = dict(params)
        if self.version == MODERN:
            extensions: dict[str, Any] = {"io.modelcontextprotocol/tasks": {}} if tasks else {}
            params["_meta"] = {**params.get("_meta", {}),
                               "io.modelcontextprotocol/protocolVersion": MODERN,
                               "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
                               "io.modelcontextprotocol/clientCapabilities": {"extensions": extensions}}
        body = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}
        response = await self.http.post(self.url, json=body, headers=self._headers(method, params))
        if "mcp-session-id" in response.headers:
            self.session = response.headers["mcp-session-id"]
        message = _message(response.text, self.ids, response.headers.get("content-type", ""))
        if "error" in message:
            raise RpcError(message["error"])
        result: dict[str, Any] = message["result"]
        return result


def _message(text: str, ident: int, content_type: str) -> dict[str, Any]:
    if content_type.startswith("application/json"):
        found: dict[str, Any] = json.loads(text)
        return found
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            data = json.loads(line[5:])
            if data.get("id") == ident:
                return dict(data)
    raise AssertionError(f"no answer to request {ident} in {text!r}")
