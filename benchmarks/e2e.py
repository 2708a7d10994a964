"""End to end: ``mcp.Client`` → gateway (``McpGateway`` + ``Engine``, caller role) → PostgreSQL → secured worker
(worker role) → back, with the no-op tool.

Both roles log in with their own passwords over TCP, as in production. The client is in-process
(``mcp.Client(server)``, one client per lane, as one agent each). The worker is a separate process by default:
``python -m mcp_hotmesh worker`` (the ``mcp-hotmesh worker`` command) with the worker role's login;
``in_process=True`` runs the same ``Worker`` inside the benchmark process instead (for profiling).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg
from mcp import Client

from mcp_hotmesh._approvals import approve_toolset
from mcp_hotmesh._caller import Engine, Outcome
from mcp_hotmesh._common import ProgressReport
from mcp_hotmesh._config import WorkerCredentials
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._migrate import migrate
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._roles import ProvisionedRole, provision_role
from mcp_hotmesh._streams import ToolRecord
from mcp_hotmesh._worker import Worker

from .db import Database
from .tools import DRAIN_STREAM, SCALE_STREAM, STREAM, drain_toolset, toolset

SCHEMA = "hmbench"
TOOLS_FILE = Path(__file__).with_name("tools.py")


@dataclass
class Roles:
    caller: ProvisionedRole
    worker: ProvisionedRole


async def prepare(db: Database) -> Roles:
    """Migrate the benchmark's schema and provision a caller and a worker role for the no-op stream."""
    admin = await asyncpg.connect(db.admin_dsn)
    try:
        await migrate(admin, SCHEMA)
        streams = [STREAM, DRAIN_STREAM, SCALE_STREAM]
        caller = await provision_role(admin, streams, "caller", schema=SCHEMA)
        worker = await provision_role(admin, streams, "worker", schema=SCHEMA)
        for tools in (toolset, drain_toolset):  # the admin runs these tools itself, as serve does
            await approve_toolset(admin, SCHEMA, tools)
    finally:
        await admin.close()
    return Roles(caller, worker)


@contextlib.asynccontextmanager
async def worker_process(db: Database, role: ProvisionedRole, concurrency: int) -> AsyncIterator[int]:
    """``mcp-hotmesh worker`` in a subprocess, logged in as ``role``; yields its pid."""
    env = {**os.environ, "HOTMESH_WORKER_PASSWORD": role.password}
    # For profiling: HOTMESH_BENCH_WORKER_PROFILE=<file> runs the worker under cProfile;
    # HOTMESH_BENCH_WORKER_WRAPPER=<script.py> runs that script instead of the CLI module (same arguments).
    profile = os.environ.get("HOTMESH_BENCH_WORKER_PROFILE")
    wrapper = os.environ.get("HOTMESH_BENCH_WORKER_WRAPPER")
    python = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else [])]
    proc = await asyncio.create_subprocess_exec(
        *python, *([wrapper] if wrapper else ["-m", "mcp_hotmesh"]), "worker", "--tools", f"{TOOLS_FILE}:toolset",
        "--dsn", db.base_dsn, "--user", role.role, "--schema", SCHEMA, "--concurrency", str(concurrency),
        "--log-level", "WARNING", env=env, stdin=subprocess.DEVNULL,
    )
    try:
        yield proc.pid
    finally:
        await stop_process(proc)


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after 15 s."""
    if proc.returncode is None:
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def worker_in_process(db: Database, role: ProvisionedRole, concurrency: int) -> AsyncIterator[int]:
    credentials = WorkerCredentials.model_validate({"user": role.role, "password": role.password})
    worker = Worker.from_toolset(toolset, connection=db.base_dsn, credentials=credentials, schema=SCHEMA,
                                 concurrency=concurrency, shutdown_grace=1.0)
    async with worker:
        yield os.getpid()


@dataclass
class Stack:
    engine: Engine
    gateway: McpGateway
    clients: list[Client]
    worker_pid: int


@contextlib.asynccontextmanager
async def stack(db: Database, roles: Roles, *, lanes: int, in_process: bool = False,
                worker_concurrency: int = 64) -> AsyncIterator[Stack]:
    """A worker, a gateway as the caller role, and ``lanes`` MCP clients, ready to call ``noop``."""
    async with contextlib.AsyncExitStack() as es:
        run_worker = worker_in_process if in_process else worker_process
        pid = await es.enter_async_context(run_worker(db, roles.worker, worker_concurrency))
        caller_dsn = db.role_dsn(roles.caller.role, roles.caller.password)
        pool = await create_pool(caller_dsn, min_size=1, max_size=10)  # what `mcp-hotmesh serve` uses
        es.push_async_callback(pool.close)
        engine = Engine(pool, schema=SCHEMA, role=roles.caller.role, listen_dsn=caller_dsn, timeout=60.0)
        await es.enter_async_context(engine)
        for _ in range(600):
            await engine.refresh()
            if any(r.name == "noop" and r.live_workers for r in engine.tools()):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the benchmark worker did not come up within 30 s")
        gateway = McpGateway(engine)
        clients = [await es.enter_async_context(Client(gateway.server)) for _ in range(lanes)]
        yield Stack(engine, gateway, clients, pid)


async def call(client: Client) -> Any:
    result = await client.call_tool("noop", {})
    if result.is_error:
        raise RuntimeError(f"the no-op call failed: {result.content}")
    return result.structured_content


class _StubEngine:
    """An ``Engine`` that answers every call at once with ``{}``: no database, no worker, no queue."""

    on_tools_changed = None
    catalog_version: object = None  # its one tool never changes

    def __init__(self) -> None:
        self.record = ToolRecord(STREAM, "", "noop", "Does nothing and returns an empty object; for benchmarks.",
                                 toolset.tools[0].input_schema, toolset.tools[0].output_schema, 1)

    def input_schema(self, name: str) -> dict[str, Any] | None:
        return self.record.input_schema if name == "noop" else None

    def tools(self) -> list[ToolRecord]:
        return [self.record]

    def listable(self) -> list[ToolRecord]:
        return [self.record]

    async def call(self, name: str, arguments: Any, *, report: ProgressReport | None = None,
                   time_limit: float | None = None, idempotency_key: str | None = None,
                   asker: Any = None, on_enqueued: Any = None) -> Outcome:
        return Outcome("ok", result={})


@contextlib.asynccontextmanager
async def mcp_only(lanes: int) -> AsyncIterator[list[Client]]:
    """The MCP layer alone: the same ``McpGateway`` and in-process clients, its engine stubbed out. What a call
    costs before any queue is involved: the most the gateway process could do with a free queue."""
    gateway = McpGateway(cast(Engine, _StubEngine()))
    async with contextlib.AsyncExitStack() as es:
        yield [await es.enter_async_context(Client(gateway.server)) for _ in range(lanes)]
