"""PGQueuer (the closest peer: Python, asyncpg, PostgreSQL) on the same database, as RPC and as a drain.

RPC: the caller enqueues a no-op job and waits for it with PGQueuer's own ``CompletionWatcher`` (LISTEN/NOTIFY
plus a safety poll; debounce 1 ms); the worker is a ``QueueManager`` with default settings in a separate
process (``python -m benchmarks.pgq_worker``), as our worker is. Drain: N jobs enqueued in one statement, then
one ``QueueManager`` in this process runs ``mode=drain`` until the queue is empty (wall clock).

PGQueuer has no roles of its own: its role owns its tables (what its docs ask of a runtime role).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg

from .common import Result, closed_loop, loop_result
from .db import Database

SCHEMA = "bench_pgq"
ENTRYPOINT = "noop"


def available() -> bool:
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return False
    return True


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA})


async def setup(db: Database) -> str:
    """A role that owns schema bench_pgq, with PGQueuer installed in it; returns the role's DSN."""
    from pgqueuer import AsyncpgDriver, Queries

    password = secrets.token_urlsafe(18)
    admin = await asyncpg.connect(db.admin_dsn)
    try:
        await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await admin.execute("DROP ROLE IF EXISTS bench_pgq")
        await admin.execute(f"CREATE ROLE bench_pgq LOGIN PASSWORD '{password}'")
        await admin.execute(f"CREATE SCHEMA {SCHEMA} AUTHORIZATION bench_pgq")
    finally:
        await admin.close()
    dsn = db.role_dsn("bench_pgq", password)
    conn = await connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()
    return dsn


@contextlib.asynccontextmanager
async def worker_process(dsn: str) -> AsyncIterator[int]:
    from .e2e import stop_process

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "benchmarks.pgq_worker",
                                                env={**os.environ, "BENCH_PGQ_DSN": dsn}, stdin=subprocess.DEVNULL)
    try:
        yield proc.pid  # jobs enqueued before it listens are taken by its first dequeue
        if proc.returncode is not None:
            raise RuntimeError("the PGQueuer worker exited early")
    finally:
        await stop_process(proc)


@contextlib.asynccontextmanager
async def rpc_client(dsn: str) -> AsyncIterator[Any]:
    """An ``op(lane)`` that enqueues one job and waits for its completion."""
    from pgqueuer import AsyncpgPoolDriver, Queries
    from pgqueuer.core.completion import CompletionWatcher

    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10, server_settings={"search_path": SCHEMA})
    assert pool is not None
    try:
        driver = AsyncpgPoolDriver(pool)
        queries = Queries(driver)
        async with driver, CompletionWatcher(driver, queries=queries, debounce=timedelta(milliseconds=1)) as watcher:

            async def op(_lane: int) -> None:
                [job_id] = await queries.enqueue(ENTRYPOINT, None)
                status = await watcher.wait_for(job_id)
                if status != "successful":
                    raise RuntimeError(f"a PGQueuer job ended {status}")

            yield op
    finally:
        try:
            await asyncio.wait_for(pool.close(), 10)
        except TimeoutError:
            pool.terminate()


async def rpc(op: Any, concurrency: int, *, seconds: float, warmup: float) -> Result:
    outcome = await closed_loop(op, concurrency, seconds=seconds, warmup=warmup)
    return loop_result("3 pgqueuer", "PGQueuer RPC (enqueue + CompletionWatcher)", concurrency, outcome,
                       note="QueueManager defaults in a subprocess; watcher debounce 1 ms")


async def drain(dsn: str, n: int) -> Result:
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    conn = await connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.clear_queue()
        for start in range(0, n, 10_000):
            k = min(10_000, n - start)
            await queries.enqueue([ENTRYPOINT] * k, [None] * k, [0] * k)
    finally:
        await conn.close()
    conn = await connect(dsn)
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job: Job) -> None:
            pass

        t0 = time.perf_counter()
        await qm.run(mode=QueueExecutionMode.drain)
        elapsed = time.perf_counter() - t0
    finally:
        await conn.close()
    return Result("3 pgqueuer", "PGQueuer drain (QueueManager mode=drain)", None, n, elapsed, n / elapsed,
                  note="one QueueManager, defaults (batch 10); wall clock incl. its start")
