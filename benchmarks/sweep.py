"""Scale out on one PostgreSQL: ``python -m benchmarks.sweep`` (``--quick`` for a smoke test).

Two axes, each step as a ratio to the first:

- topics served by one ``mcp-hotmesh worker`` process with default options (10 → 100 → 1,000): seconds until
  it announced them all, connections it holds, and, idle, its CPU (% of a core) and the statements per second
  PostgreSQL runs (transactions committed in the database; nothing else runs meanwhile);
- worker processes on one stream (1 → 4 → 16), 16 concurrent calls through a gateway's ``Engine``: calls per
  second, p50, claims per call (``_claim`` calls, counted by PostgreSQL with ``track_functions``) and how many
  processes listen once the load has run ``--settle`` seconds (the others park: ``_pulse``). The worker role may
  hold ``--connection-limit`` sessions (16 processes of the README's busy case, 5 each); its default, 32, leaves
  16 processes one pooled connection each, which they share (``_postgres.Room``).

It also times ``tools/list`` through the MCP client at the largest topic step's number of tools.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx2
from mcp import Client

from mcp_hotmesh._caller import Engine
from mcp_hotmesh._http import run_http
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._migrate import migrate
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._roles import ProvisionedRole, provision_role

from .common import closed_loop, percentile
from .db import Database, database

SCHEMA = "sweep"
RESULTS = Path(__file__).with_name("results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topics", default="10,100,1000", help="topics per worker process, comma-separated")
    p.add_argument("--processes", default="1,4,16", help="worker processes on one stream, comma-separated")
    p.add_argument("--idle", type=float, default=10.0, help="seconds idle measured at each topic step (10)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of calls at each process step (5)")
    p.add_argument("--settle", type=float, default=12.0,
                   help="seconds of calls before a step of several processes is measured: some park (12)")
    p.add_argument("--connection-limit", type=int, default=80,
                   help="the worker role's CONNECTION LIMIT in the process steps (80)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS, help="where sweep.json goes (benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.topics, args.processes, args.idle, args.seconds, args.settle = "3,12", "1,2", 1.0, 0.5, 1.0
    args.topic_steps = [int(s) for s in str(args.topics).split(",") if s.strip()]
    args.process_steps = [int(s) for s in str(args.processes).split(",") if s.strip()]
    return args


@contextlib.asynccontextmanager
async def workers(db: Database, role: ProvisionedRole, count: int, topics: int,
                  prefix: str) -> AsyncIterator[list[int]]:
    """``count`` ``mcp-hotmesh worker`` processes with default options, each serving ``topics`` no-op tools."""
    env = {**os.environ, "HOTMESH_WORKER_PASSWORD": role.password, "SWEEP_TOPICS": str(topics),
           "SWEEP_PREFIX": prefix}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_hotmesh", "worker", "--tools", "benchmarks.sweep_tools:toolset",
        "--dsn", db.base_dsn, "--user", role.role, "--schema", SCHEMA, "--log-level", "WARNING",
        env=env, stdin=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except TimeoutError:
                p.kill()
                await p.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def transactions(admin: asyncpg.Connection) -> int:
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    return int(await admin.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"))


async def live(admin: asyncpg.Connection, role: str) -> int:
    return int(await admin.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.workers WHERE role_name = $1 AND expires_at > now()", role))


async def wait_live(admin: asyncpg.Connection, role: str, count: int, limit: float = 300) -> float:
    t0 = time.perf_counter()
    while await live(admin, role) < count:
        if time.perf_counter() - t0 > limit:
            raise RuntimeError(f"workers did not come up within {limit:.0f} s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


async def topic_step(db: Database, admin: asyncpg.Connection, n: int, idle: float) -> dict[str, Any]:
    prefix = f"sweep.t{n}"
    role = await provision_role(admin, [f"{prefix}_{i:04d}" for i in range(n)], "worker", schema=SCHEMA)
    async with workers(db, role, 1, n, prefix) as [pid]:
        start = await wait_live(admin, role.role, n)
        await asyncio.sleep(11)  # let the start settle: a backend reports its counts up to 10 s late
        conns = int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role.role))
        cpu0, tx0, t0 = cpu_seconds(pid), await transactions(admin), time.perf_counter()
        await asyncio.sleep(idle)
        cpu1, tx1, t1 = cpu_seconds(pid), await transactions(admin), time.perf_counter()
        conns = max(conns, int(await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role.role)))
    elapsed = t1 - t0
    # our own two reads of pg_stat_database are transactions too
    return {"topics": n, "start_s": start, "connections": conns, "idle_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
            "idle_statements_per_s": max(tx1 - tx0 - 2, 0) / elapsed}


async def claims(admin: asyncpg.Connection) -> int:
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    return int(await admin.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE schemaname = $1 AND funcname = '_claim'",
        SCHEMA))


async def process_step(db: Database, admin: asyncpg.Connection, worker: ProvisionedRole, caller: ProvisionedRole,
                       count: int, seconds: float, settle: float) -> dict[str, Any]:
    before = await claims(admin)
    caller_dsn = db.role_dsn(caller.role, caller.password)
    async with workers(db, worker, count, 1, "sweep.herd"):
        await wait_live(admin, worker.role, count)
        pool = await create_pool(caller_dsn, max_size=10)
        try:
            async with Engine(pool, schema=SCHEMA, role=caller.role, listen_dsn=caller_dsn) as engine:
                while not any(r.live_workers >= count for r in engine.tools()):
                    await engine.refresh()
                    await asyncio.sleep(0.05)

                async def op(_lane: int) -> None:
                    outcome = await engine.call("sweep_herd_0000", {})
                    if outcome.kind != "ok":
                        raise RuntimeError(f"the call failed: {outcome}")

                warmup = settle if count > 1 else min(1.0, seconds)  # the processes not needed park meanwhile
                done, elapsed, lat = await closed_loop(op, 16, seconds=seconds, warmup=warmup)
                listening = int(await admin.fetchval(
                    f"SELECT count(DISTINCT consumer) FILTER (WHERE NOT parked) FROM {SCHEMA}.workers "
                    "WHERE role_name = $1 AND expires_at > now()", worker.role))
        finally:
            await pool.close()
    calls = int(await admin.fetchval(f"SELECT count(*) FROM {SCHEMA}.messages WHERE stream = 'sweep.herd_0000'"))
    await admin.execute(f"DELETE FROM {SCHEMA}.messages WHERE stream = 'sweep.herd_0000'")
    await asyncio.sleep(1.5)  # the workers' sessions ended; their counts reach the statistics
    made = await claims(admin) - before
    return {"processes": count, "calls_per_s": done / elapsed, "p50_ms": percentile(lat, 0.5),
            "claims_per_call": made / max(calls, 1), "calls": calls, "listening": listening}


async def tools_list(db: Database, admin: asyncpg.Connection, n: int, samples: int) -> dict[str, Any]:
    """tools/list with ``n`` registered tools (those of the largest topic step): raw JSON-RPC over Streamable HTTP
    (the gateway's answer, bytes read, nothing parsed) and through the ``mcp`` client in-process (which also
    validates the 1,000 tools it receives)."""
    prefix = f"sweep.t{n}"
    caller = await provision_role(admin, [f"{prefix}_{i:04d}" for i in range(n)], "caller", schema=SCHEMA)
    dsn = db.role_dsn(caller.role, caller.password)
    pool = await create_pool(dsn, max_size=4)
    token = secrets.token_urlsafe(24)
    port = 20_000 + secrets.randbelow(10_000)
    try:
        engine = Engine(pool, schema=SCHEMA, role=caller.role, listen_dsn=dsn)
        gateway = McpGateway(engine)
        async with engine, Client(gateway.server) as client, anyio.create_task_group() as tg:
            listed = len((await client.list_tools()).tools)
            sdk = []
            for _ in range(samples):
                t0 = time.perf_counter()
                await client.list_tools()
                sdk.append((time.perf_counter() - t0) * 1000)
            stop, started = anyio.Event(), anyio.Event()
            tg.start_soon(lambda: run_http(gateway, host="127.0.0.1", port=port, token=token, stop=stop,
                                           started=started))
            await started.wait()
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
            async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
                url = f"http://127.0.0.1:{port}/mcp"
                hello = {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "sweep", "version": "1"}}
                init = await http.post(url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello})
                session = {k: v for k, v in init.headers.items() if k.lower() == "mcp-session-id"}
                session["MCP-Protocol-Version"] = "2025-06-18"
                await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
                raw = []
                size = 0
                for i in range(samples):
                    t0 = time.perf_counter()
                    reply = await http.post(url, json={"jsonrpc": "2.0", "id": i + 1, "method": "tools/list"},
                                            headers=session)
                    size = len(reply.content)
                    raw.append((time.perf_counter() - t0) * 1000)
                    if reply.status_code != 200:
                        raise RuntimeError(f"tools/list over HTTP: {reply.status_code} {reply.text[:200]}")
            stop.set()
    finally:
        await pool.close()
    return {"tools": listed, "http_p50_ms": percentile(raw, 0.5), "http_p99_ms": percentile(raw, 0.99),
            "http_bytes": size, "sdk_p50_ms": percentile(sdk, 0.5), "sdk_p99_ms": percentile(sdk, 0.99)}


def ratio(rows: list[dict[str, Any]], key: str) -> list[str]:
    base = rows[0][key]
    return [f"{r[key]:.2f} ({r[key] / base:.2f}x)" if base else f"{r[key]:.2f}" for r in rows]


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with database() as db:
        admin = await asyncpg.connect(db.admin_dsn)
        try:
            await migrate(admin, SCHEMA)
            # generated tool sets in worker processes: their definitions go live as registered (no admin between)
            await admin.execute(f"UPDATE \"{SCHEMA}\".settings SET value = 0 WHERE key = 'approve_tools'")
            topic_rows = [await topic_step(db, admin, n, args.idle) for n in args.topic_steps]
            listing = await tools_list(db, admin, args.topic_steps[-1], 5 if args.quick else 50)
            worker = await provision_role(admin, ["sweep.herd_0000"], "worker", schema=SCHEMA)
            caller = await provision_role(admin, ["sweep.herd_0000"], "caller", schema=SCHEMA)
            await admin.execute(f"ALTER ROLE \"{worker.role}\" SET track_functions = 'pl'")
            await admin.execute(f"ALTER ROLE \"{worker.role}\" CONNECTION LIMIT {int(args.connection_limit)}")
            process_rows = [await process_step(db, admin, worker, caller, p, args.seconds, args.settle)
                            for p in args.process_steps]
        finally:
            await admin.close()
    print("topics in one worker process (default options)")
    print(f"{'topics':>8} {'start s':>16} {'connections':>14} {'idle CPU %':>16} {'idle stmt/s':>16}")
    for row, s, c, cpu, st in zip(topic_rows, ratio(topic_rows, "start_s"), ratio(topic_rows, "connections"),
                                  ratio(topic_rows, "idle_cpu_pct"), ratio(topic_rows, "idle_statements_per_s"),
                                  strict=True):
        print(f"{row['topics']:>8} {s:>16} {c:>14} {cpu:>16} {st:>16}")
    print(f"tools/list with {listing['tools']} tools: over HTTP p50 {listing['http_p50_ms']:.1f} ms, "
          f"p99 {listing['http_p99_ms']:.1f} ms ({listing['http_bytes']:,} bytes); through the mcp client in-process "
          f"(parsing included) p50 {listing['sdk_p50_ms']:.1f} ms")
    print(f"worker processes on one stream, 16 concurrent calls (worker role's connection limit "
          f"{args.connection_limit})")
    print(f"{'processes':>9} {'calls/s':>18} {'p50 ms':>16} {'claims/call':>16} {'listening':>10}")
    for row, r, p, c in zip(process_rows, ratio(process_rows, "calls_per_s"), ratio(process_rows, "p50_ms"),
                            ratio(process_rows, "claims_per_call"), strict=True):
        print(f"{row['processes']:>9} {r:>18} {p:>16} {c:>16} {row['listening']:>10}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(
        {"topics": topic_rows, "tools_list": listing, "processes": process_rows, "database": db.description},
        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
