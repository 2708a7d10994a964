"""Faults: workers killed under load, PostgreSQL restarted, the gateway restarted, a poison message, a LISTEN
connection that dies silently. Nothing is lost, nothing is answered twice, nothing hangs.

Workers run as ``mcp-hotmesh worker`` processes (logged in as a worker role), so SIGKILL is a real crash; the
gateway is the in-process MCP server (``mcp.Client(server)``), except where the gateway itself is what fails:
there it is ``mcp-hotmesh serve`` over stdio. Every test is bounded by ``fail_after`` and kills every process it
started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import asyncpg
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult

from mcp_hotmesh import _admin as admin
from mcp_hotmesh import _embedded as embedded
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._migrate import migrate
from mcp_hotmesh._postgres import create_pool, is_transient, translate
from mcp_hotmesh._roles import provision_role
from mcp_hotmesh.errors import ConnectionFailed
from tests.helpers import (
    ROOT,
    Env,
    WorkerProcs,
    clean_environ,
    cli_command,
    free_port,
    hub_for,
    text_of,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # subprocesses, server restarts, faults

# The worker processes' tool module, after helpers.TOOLS_PREAMBLE (toolset, MARKS).
TOOLS = '''
@toolset.tool(topic="fault.work", name="fault_work")
async def work(n: int, ms: int = 100) -> dict[str, int]:
    """Work on n for ms milliseconds; returns n."""
    (MARKS / f"work-{n}-{os.getpid()}").touch()
    await anyio.sleep(ms / 1000)
    return {"n": n}


@toolset.tool(topic="fault.poison", name="fault_poison")
async def poison(n: int = 0) -> dict[str, int]:
    """Kills the worker process that runs it, every time."""
    (MARKS / f"poison-{os.getpid()}").touch()
    os._exit(17)


@toolset.tool(topic="fault.echo", name="fault_echo")
async def echo(text: str) -> dict[str, str]:
    """Returns the text."""
    return {"text": text}
'''
STREAMS = ["fault.work", "fault.poison", "fault.echo"]

# What a caller may be told when a fault ends its call: clear, and never a hang.
CLEAR_ERRORS = ("unreachable right now", "did not finish within", "stopped responding", "deadline passed")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[WorkerProcs]:
    with WorkerProcs(tmp_path, TOOLS) as p:
        yield p


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@contextlib.asynccontextmanager
async def gateway(pool: asyncpg.Pool, schema: str, role: str, dsn: str,
                  call_timeout: float = 30.0) -> AsyncIterator[Engine]:
    """The gateway's engine for a caller role, once the tools are live; its MCP server is ``McpGateway(engine)``."""
    engine = Engine(pool, schema=schema, role=role, listen_dsn=dsn, timeout=call_timeout, recheck_interval=1.0)
    async with engine:

        async def live() -> bool:
            await engine.refresh()
            return {r.name for r in engine.tools() if r.live_workers} >= {"fault_work", "fault_echo"}

        await wait_for(live, 30)
        yield engine


async def rows(conn: asyncpg.Connection, schema: str, stream: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT (args->>'n')::int AS n, state, reclaims, attempt, error, is_error FROM \"{schema}\".messages "
        "WHERE stream = $1 ORDER BY id", stream)


# -------------------------------------------------------------------------------------------- SIGKILL workers
async def test_sigkill_random_workers_under_load(env: Env, procs: WorkerProcs) -> None:
    """300 calls through the gateway, three workers, a random one killed (and replaced) every 0.6 s, five times. Every
    call gets exactly one answer, its own; the killed workers' calls are reclaimed and run again elsewhere."""
    calls, kills = 300, 5
    worker_role = await env.provision(STREAMS, "worker")
    caller_role = await env.provision(STREAMS, "caller")
    dsn = env.dsn(worker_role)
    options = ("--reclaim-delay", "1000", "--concurrency", "20")
    alive = [procs.start(dsn, env.schema, *options) for _ in range(3)]
    started = {p.pid: time.monotonic() for p in alive}
    rng = random.Random(6)
    results: dict[int, list[CallToolResult]] = {}
    async with gateway(await env.pool(caller_role, max_size=20), env.schema, caller_role.role,
                       env.dsn(caller_role)) as engine, Client(McpGateway(engine).server) as client:

        async def call(n: int) -> None:
            result = await client.call_tool("fault_work", {"n": n, "ms": rng.randint(100, 500)})
            results.setdefault(n, []).append(result)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:

                async def load() -> None:  # a steady load: 25 new calls every 0.25 s
                    for n in range(calls):
                        tg.start_soon(call, n)
                        if n % 25 == 24:
                            await anyio.sleep(0.25)

                tg.start_soon(load)
                for _ in range(kills):
                    await anyio.sleep(0.6)
                    # a random one of those that have been up a while (so it has calls in flight)
                    victim = rng.choice([p for p in alive if time.monotonic() - started[p.pid] > 1.0] or alive)
                    alive.remove(victim)
                    await anyio.to_thread.run_sync(kill, victim)
                    alive.append(replacement := procs.start(dsn, env.schema, *options))
                    started[replacement.pid] = time.monotonic()

    assert sorted(results) == list(range(calls))
    assert all(len(answers) == 1 for answers in results.values())  # one answer per call
    failed = {n: text_of(r[0]) for n, r in results.items() if r[0].is_error}
    for n, [result] in results.items():
        if n not in failed:
            assert result.structured_content == {"n": n}  # its own answer, not another call's
    for n, text in failed.items():
        assert any(words in text for words in CLEAR_ERRORS), (n, text)

    table = await rows(env.admin, env.schema, "fault.work")
    assert sorted(r["n"] for r in table) == list(range(calls))  # one message per call: none lost, none doubled
    assert {r["state"] for r in table} <= {"done", "dead"}
    dead = {r["n"]: r for r in table if r["state"] == "dead"}
    assert set(dead) == set(failed)  # the dead-letter queue holds exactly the calls whose callers were told
    for n, row in dead.items():  # and only what policy put there: reclaims used up, or the deadline
        assert row["reclaims"] > 3 or "deadline" in row["error"], row
        assert row["error"] in failed[n]
    assert all(not r["is_error"] for r in table if r["state"] == "done")
    reclaimed = [r for r in table if r["reclaims"]]
    ran_twice = [key for key, pids in procs.ran("work").items() if len(pids) > 1]
    assert reclaimed and ran_twice, "no kill landed on a running call"
    assert sum(1 for p in procs.procs if p.returncode == -signal.SIGKILL) == kills


# ------------------------------------------------------------------------------------------ PostgreSQL restart
async def test_postgres_restart_in_the_middle_of_the_load(tmp_path: Path, procs: WorkerProcs) -> None:
    """A server of its own, stopped and started again on the same port while calls run. The gateway and the
    workers reconnect by themselves; calls in flight end with an answer or a clear error; later calls work."""
    os.chmod(tmp_path, 0o755)  # the embedded server's OS user must reach its data directory
    data_dir, port, schema = tmp_path / "pg", free_port(), "faults"
    server = await anyio.to_thread.run_sync(lambda: embedded.start(data_dir, port=port))
    pool: asyncpg.Pool | None = None
    try:
        admin = await asyncpg.connect(server.admin_dsn)
        try:
            await migrate(admin, schema)
            # the worker processes' definitions go live at once, as in the other tests (conftest)
            await admin.execute(f'UPDATE "{schema}".settings SET value = 0 WHERE key = $1', "approve_tools")
            worker = await provision_role(admin, STREAMS, "worker", schema=schema)
            caller = await provision_role(admin, STREAMS, "caller", schema=schema)
        finally:
            await admin.close()
        workers = [procs.start(server.role_dsn(worker.role, worker.password), schema) for _ in range(2)]
        caller_dsn = server.role_dsn(caller.role, caller.password)
        pool = await create_pool(caller_dsn, max_size=10)
        results: dict[int, CallToolResult] = {}
        async with gateway(pool, schema, caller.role, caller_dsn, call_timeout=20.0) as engine, \
                Client(McpGateway(engine).server) as client:

            async def call(n: int) -> None:
                results[n] = await client.call_tool("fault_work", {"n": n, "ms": 300})

            with anyio.fail_after(60):  # never a hang
                async with anyio.create_task_group() as tg:

                    async def load() -> None:
                        for n in range(80):
                            tg.start_soon(call, n)
                            await anyio.sleep(0.04)

                    tg.start_soon(load)
                    await anyio.sleep(1.0)
                    await anyio.to_thread.run_sync(server.stop)
                    await anyio.sleep(1.5)
                    restarted = await anyio.to_thread.run_sync(lambda: embedded.start(data_dir, port=port))
                    assert restarted.port == port
            assert sorted(results) == list(range(80))
            answered = {n for n, r in results.items() if not r.is_error}
            for n, result in results.items():
                if n in answered:
                    assert result.structured_content == {"n": n}
                else:
                    assert any(words in text_of(result) for words in CLEAR_ERRORS), (n, text_of(result))
            # some got through, some were cut off by the restart
            assert answered and len(answered) < 80, {n: text_of(r) for n, r in results.items()}

            # calls made after the restart work, through the same gateway and the same worker processes
            with anyio.fail_after(30):
                after = [await client.call_tool("fault_work", {"n": 1000 + i, "ms": 10}) for i in range(10)]
            assert [r.structured_content for r in after] == [{"n": 1000 + i} for i in range(10)], \
                [text_of(r) for r in after]
            assert all(w.poll() is None for w in workers), procs.logs()

            async def listening_again() -> bool:
                return engine.listener.reconnects >= 1 and engine.listener.connected.is_set()

            await wait_for(listening_again, 15)
        admin = await asyncpg.connect(server.admin_dsn)
        try:
            async def settled() -> bool:  # nothing stays in flight: every message ends done or dead
                left = await admin.fetchval(
                    f"SELECT count(*) FROM \"{schema}\".messages "
                    "WHERE state NOT IN ('done', 'dead', 'cancelled', 'expired')")
                return bool(left == 0)

            await wait_for(settled, 30)
        finally:
            await admin.close()
    finally:
        if pool is not None:
            pool.terminate()
        procs.cleanup()
        await anyio.to_thread.run_sync(lambda: embedded.EmbeddedServer(
            data_dir, server.socket_dir, port, started_here=True).stop())


# -------------------------------------------------------------------------------------------- gateway restart
async def test_gateway_restart_with_calls_queued(env: Env, procs: WorkerProcs) -> None:
    """``serve`` is SIGKILLed with calls queued behind a busy worker. Their caller is gone: they expire by their
    deadline (never run late), nothing stays ready or running, and a new ``serve`` answers at once."""
    worker_role = await env.provision(STREAMS, "worker")
    caller_role = await env.provision(STREAMS, "caller")
    procs.start(env.dsn(worker_role), env.schema, "--concurrency", "2")

    async def live() -> bool:
        return bool(await env.admin.fetchval(
            f'SELECT count(DISTINCT stream) = 3 FROM "{env.schema}".workers WHERE expires_at > now()'))

    await wait_for(live, 30)
    serve_env = clean_environ(HOTMESH_DSN=env.dsn(caller_role), HOTMESH_SCHEMA=env.schema)
    queued = 12
    requests = [
        {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "doomed", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        *[{"jsonrpc": "2.0", "id": n + 1, "method": "tools/call",
           "params": {"name": "fault_work", "arguments": {"n": n, "ms": 1000}}} for n in range(queued)],
    ]
    old = await anyio.open_process([*cli_command(), "serve", "--timeout", "2"], env=serve_env, cwd=ROOT,
                                   stderr=subprocess.DEVNULL)
    try:
        assert old.stdin is not None
        await old.stdin.send("".join(json.dumps(r) + "\n" for r in requests).encode())

        async def all_queued() -> bool:
            return len(await rows(env.admin, env.schema, "fault.work")) == queued

        await wait_for(all_queued, 30)
        old.kill()  # SIGKILL: no goodbye, no cancel; its callers are simply gone
        with anyio.fail_after(10):
            await old.wait()
    finally:
        if old.returncode is None:
            old.kill()
        await old.aclose()
    killed_at = time.monotonic()

    command, *prefix = cli_command()
    params = StdioServerParameters(command=command, args=[*prefix, "serve", "--timeout", "10"], cwd=str(ROOT),
                                   env=serve_env)
    async with Client(params, read_timeout_seconds=30) as client:
        started = time.monotonic()
        result = await client.call_tool("fault_echo", {"text": "a new gateway"})
        answered_in = time.monotonic() - started
    assert result.structured_content == {"text": "a new gateway"}, text_of(result)
    assert answered_in < 5, answered_in  # not stuck behind the dead gateway's calls

    async def settled() -> bool:
        table = await rows(env.admin, env.schema, "fault.work")
        return all(r["state"] in ("done", "expired") for r in table)

    await wait_for(settled, 10)
    assert time.monotonic() - killed_at < 15
    table = await rows(env.admin, env.schema, "fault.work")
    ran = procs.ran("work")
    for row in table:
        if row["state"] == "expired":  # their time ran out: no failure, not in the dead-letter queue
            assert "deadline passed" in row["error"], row
        if row["state"] == "expired" and "waited in the queue" in row["error"]:
            assert f"work-{row['n']}" not in ran, row  # expired in the queue: never run
    assert sum(1 for r in table if "waited in the queue" in (r["error"] or "")) >= queued // 2
    st = await admin.status(env.admin, env.schema)
    work = next(s for s in st.streams if s.stream == "fault.work")
    assert (work.ready, work.in_flight, work.stalled, work.retrying, work.dead) == (0, 0, 0, 0, 0)


# ----------------------------------------------------------------------------------------------- poison
async def test_a_poison_message_ends_in_the_dead_letter_queue_and_the_caller_is_told(
    env: Env, procs: WorkerProcs
) -> None:
    """A handler that kills its worker every time: a supervisor (systemd, Kubernetes) starts the worker again,
    each start reclaims the message once more, and after --reclaim-count reclaims it is dead-lettered and the
    caller gets an error saying so. Other calls go on being served."""
    worker_role = await env.provision(STREAMS, "worker")
    caller_role = await env.provision(STREAMS, "caller")
    dsn = env.dsn(worker_role)
    options = ("--reclaim-delay", "300", "--reclaim-count", "2")
    current = [procs.start(dsn, env.schema, *options)]
    done = anyio.Event()

    async def supervisor() -> None:
        for _ in range(8):  # bounded: a real supervisor would back off too
            while current[-1].poll() is None and not done.is_set():  # noqa: ASYNC110  (a process, not an event)
                await anyio.sleep(0.05)
            if done.is_set():
                return
            current.append(procs.start(dsn, env.schema, *options))

    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor)
        try:
            async with gateway(await env.pool(caller_role), env.schema, caller_role.role,
                               env.dsn(caller_role)) as engine, Client(McpGateway(engine).server) as client:
                with anyio.fail_after(40):
                    result = await client.call_tool("fault_poison", {"n": 1})
                assert result.is_error
                assert "the worker handling this call stopped responding 3 time(s)" in text_of(result)
                with anyio.fail_after(20):
                    echoed = await client.call_tool("fault_echo", {"text": "after the poison"})
                assert echoed.structured_content == {"text": "after the poison"}, text_of(echoed)
        finally:
            done.set()
    crashed = [p for p in current if p.returncode == 17]
    assert len(crashed) == 3  # the first run and one per reclaim: reclaim_count 2, so dead at the third reclaim
    [dead] = await admin.dlq_list(env.admin, env.schema, admin.DlqFilter(stream="fault.poison"))
    assert dead.reclaims == 3 and dead.attempt == 0 and "stopped responding" in (dead.error or "")


# ------------------------------------------------------------------------------------------- silent LISTEN
@dataclass
class _Pipe:
    frozen: bool = False


class Proxy:
    """A TCP proxy to PostgreSQL. ``freeze()`` makes every connection open now go silent (bytes are held, the
    sockets stay open: a dead NAT entry, a blocked firewall); connections made later pass as usual."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pipes: list[_Pipe] = []
        self.port = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._handle)

    def freeze(self) -> None:
        for pipe in self.pipes:
            pipe.frozen = True

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        pipe = _Pipe()
        self.pipes.append(pipe)
        async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as upstream, \
                anyio.create_task_group() as tg:

            async def pump(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                                         OSError):
                    async for chunk in src:
                        if pipe.frozen:
                            await anyio.sleep_forever()
                        await dst.send(chunk)
                tg.cancel_scope.cancel()

            tg.start_soon(pump, client, upstream)
            tg.start_soon(pump, upstream, client)


async def test_a_silently_dead_listen_connection_falls_back_and_is_reestablished(env: Env) -> None:
    """The gateway's LISTEN connection goes through a proxy that then blocks it: no error, no close, no
    notifications. Calls still complete (the gateway re-reads waiting calls on a timer), and the listener
    notices the silence, drops the connection and listens on a new one."""
    proxy = Proxy(env.server.tcp_port)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.run)
        async with hub_for(env, recheck_interval=0.5) as hub:
            caller = hub.caller
            listen_dsn = f"postgresql://{caller.role}:{caller.password}@127.0.0.1:{proxy.port}/{env.server.database}"
            assert isinstance(hub.engine.api.pool, asyncpg.Pool)
            engine = Engine(hub.engine.api.pool, schema=env.schema, role=caller.role, listen_dsn=listen_dsn,
                            timeout=20.0, recheck_interval=0.5)
            async with engine, Client(McpGateway(engine).server) as client:
                assert engine.listener.connected.is_set() and len(proxy.pipes) == 1
                assert not (await client.call_tool("echo", {"text": "before"})).is_error
                proxy.freeze()
                with anyio.fail_after(10):
                    during = [await client.call_tool("echo", {"text": f"during {i}"}) for i in range(3)]
                assert [r.structured_content for r in during] == [
                    {"text": f"during {i}", "length": 8} for i in range(3)]

                async def reestablished() -> bool:
                    return engine.listener.reconnects >= 1 and engine.listener.connected.is_set()

                await wait_for(reestablished, 10)
                assert len(proxy.pipes) >= 2  # a new connection, not the frozen one
                heard = anyio.Event()
                handler = engine.listener._handler

                def spy(channel: str, payload: str) -> None:
                    if payload.startswith("r:"):
                        heard.set()
                    handler(channel, payload)

                engine.listener._handler = spy
                assert not (await client.call_tool("echo", {"text": "after"})).is_error
                with anyio.fail_after(5):
                    await heard.wait()  # answers are heard by NOTIFY again
        tg.cancel_scope.cancel()


async def test_terminated_listen_sessions_of_gateway_and_worker(env: Env) -> None:
    """pg_terminate_backend on the LISTEN sessions of the gateway and of the worker at once: calls complete,
    and each listener is re-established by itself."""
    async with hub_for(env, recheck_interval=0.5) as hub, Client(hub.gateway.server) as client:
        worker_role = await env.admin.fetchval(
            f'SELECT role_name FROM "{env.schema}".workers WHERE expires_at > now() LIMIT 1')
        roles = [hub.caller.role, worker_role]

        async def listen_pids() -> dict[str, int]:
            found = await env.admin.fetch(
                "SELECT usename, pid FROM pg_stat_activity WHERE usename = ANY($1::text[]) AND query LIKE 'LISTEN%'",
                roles)
            return {r["usename"]: r["pid"] for r in found}

        before = await listen_pids()
        assert set(before) == set(roles)
        await env.admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid",
                                list(before.values()))
        with anyio.fail_after(15):
            results = [await client.call_tool("echo", {"text": str(i)}) for i in range(5)]
        assert [r.structured_content for r in results] == [{"text": str(i), "length": 1} for i in range(5)]

        async def relistening() -> bool:
            now = await listen_pids()
            return set(now) == set(roles) and not set(now.values()) & set(before.values())

        await wait_for(relistening, 15)
        assert hub.engine.listener.reconnects >= 1


def test_a_connection_left_mid_operation_is_a_connection_failure() -> None:
    """Seen when PostgreSQL restarts under load: asyncpg reuses a connection whose last query ended with the
    server's shutdown error before the close was noticed. Callers must hear "unreachable, try again", and a
    worker must retry its answer, not die of an unknown exception."""
    exc = asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    translated_ = translate(exc)
    assert isinstance(translated_, ConnectionFailed) and is_transient(translated_)
