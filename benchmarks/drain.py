"""Drain: N calls enqueued by the caller role before any worker runs, then answered by one worker.

The calls are real calls (``caller_call_many``, a deadline an hour away). The worker is the ``Worker`` runtime in
this process, logged in as the worker role over TCP; the clock runs from just before it starts (so its start
counts, as PGQueuer's does) to the last answer's commit time.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from mcp_hotmesh._config import WorkerCredentials
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._streams import CallerAPI
from mcp_hotmesh._worker import Worker

from .common import Result
from .db import Database
from .e2e import SCHEMA, Roles
from .tools import DRAIN_STREAM, drain_toolset


async def enqueue(db: Database, roles: Roles, n: int) -> None:
    pool = await create_pool(db.role_dsn(roles.caller.role, roles.caller.password), max_size=2)
    try:
        api = CallerAPI(pool, SCHEMA)
        for start in range(0, n, 1000):
            await api.call_many([(DRAIN_STREAM, "", {}, 3_600_000)] * min(1000, n - start))
    finally:
        await pool.close()


async def _drained(admin: asyncpg.Connection) -> None:
    """Return once no call on the drain stream is queued or running (polled every 50 ms)."""
    while True:
        left = await admin.fetchval(
            f"SELECT count(*) FROM {SCHEMA}.messages WHERE stream = $1 AND state IN ('ready', 'reserved')",
            DRAIN_STREAM,
        )
        if not left:
            return
        await asyncio.sleep(0.05)


async def run(db: Database, roles: Roles, n: int, *, concurrency: int) -> Result:
    admin = await asyncpg.connect(db.admin_dsn)
    try:
        await admin.execute(f"DELETE FROM {SCHEMA}.messages WHERE stream = $1", DRAIN_STREAM)
        await enqueue(db, roles, n)
        await admin.execute(f"ANALYZE {SCHEMA}.messages")
        credentials = WorkerCredentials.model_validate({"user": roles.worker.role, "password": roles.worker.password})
        worker = Worker.from_toolset(drain_toolset, connection=db.base_dsn, credentials=credentials, schema=SCHEMA,
                                     concurrency=concurrency, shutdown_grace=1.0)
        t0 = time.time()
        async with worker:
            await _drained(admin)
        row = await admin.fetchrow(
            f"SELECT count(*) FILTER (WHERE state = 'done') AS done, "
            f"extract(epoch FROM max(finished_at))::float8 AS last FROM {SCHEMA}.messages WHERE stream = $1",
            DRAIN_STREAM,
        )
    finally:
        await admin.close()
    assert row is not None
    elapsed = row["last"] - t0
    if row["done"] != n:
        raise RuntimeError(f"the drain answered {row['done']} of {n} calls")
    return Result("4 drain", "drain, one worker (Worker in-process)", concurrency, n, elapsed, n / elapsed,
                  note=f"{n} calls queued first; worker concurrency {concurrency}; wall clock incl. its start")
