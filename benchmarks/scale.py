"""Scale: how long a claim takes with 10k, 100k and 1M calls waiting, and memory over a long run.

Claim latency: calls are inserted (as the admin, in one statement each step: real call rows, owned by the
caller role) until N wait on one stream, below whatever history the earlier parts left on other streams; then
the worker role claims one message at a time (``worker_dequeue``, batch 1) and answers it, ``samples`` times.
The latency of the claim alone is what is reported.
"""

from __future__ import annotations

import time

import asyncpg

from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._streams import WorkerAPI

from .common import Result, percentile
from .db import Database
from .e2e import SCHEMA, Roles
from .tools import SCALE_STREAM

FILL = f"""
INSERT INTO {SCHEMA}.messages (stream, workflow_name, args, call_id, owner, deadline)
SELECT $1, '', '{{}}'::jsonb, gen_random_uuid(), $2, now() + interval '1 day' FROM generate_series(1, $3)
"""


async def claim_latency(db: Database, roles: Roles, sizes: list[int], *, samples: int) -> list[Result]:
    admin = await asyncpg.connect(db.admin_dsn)
    pool = await create_pool(db.role_dsn(roles.worker.role, roles.worker.password), max_size=2)
    api = WorkerAPI(pool, SCHEMA)
    results = []
    try:
        await admin.execute(f"DELETE FROM {SCHEMA}.messages WHERE stream = $1", SCALE_STREAM)
        waiting = 0
        for size in sizes:
            t0 = time.perf_counter()
            await admin.execute(FILL, SCALE_STREAM, roles.caller.role, size - waiting)
            await admin.execute(f"ANALYZE {SCHEMA}.messages")
            fill_seconds = time.perf_counter() - t0
            latencies = []
            for _ in range(samples):
                t1 = time.perf_counter()
                [msg] = await api.dequeue(SCALE_STREAM, "scale", 1, 60_000, [""])
                latencies.append((time.perf_counter() - t1) * 1000)
                await api.respond(SCALE_STREAM, msg.id, msg.lease, {})
            waiting = size - samples
            plan = await _claim_plan(admin)
            total = sum(latencies) / 1000
            results.append(Result(
                "5 scale", f"claim with {_n(size)} calls waiting", 1, samples, total, samples / total,
                percentile(latencies, 0.5), percentile(latencies, 0.99),
                note=f"worker_dequeue batch 1; filled in {fill_seconds:.1f} s",
                extra={"waiting": size, "plan": plan, "fill_seconds": fill_seconds,
                       "table_rows": await admin.fetchval(f"SELECT count(*) FROM {SCHEMA}.messages")},
            ))
        await admin.execute(f"DELETE FROM {SCHEMA}.messages WHERE stream = $1", SCALE_STREAM)
        await admin.execute(f"VACUUM {SCHEMA}.messages")
    finally:
        await pool.close()
        await admin.close()
    return results


async def _claim_plan(admin: asyncpg.Connection) -> str:
    """The index the claim's candidate scan uses (the statement inside _claim, as a generic plan)."""
    await admin.execute("SET plan_cache_mode = force_generic_plan")
    try:
        stmt = await admin.prepare(
            f"EXPLAIN SELECT m.id FROM {SCHEMA}.messages m WHERE m.stream >= $1 AND m.stream <= $1 "
            "AND m.state = 'ready' AND m.visible_at <= now() AND ($2::text[] IS NULL OR m.workflow_name = ANY ($2)) "
            "ORDER BY m.stream, m.id LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
        lines = [r[0] for r in await stmt.fetch(SCALE_STREAM, [""])]
    finally:
        await admin.execute("RESET plan_cache_mode")
    return next((line.strip().lstrip("-> ") for line in lines if "Scan" in line), "?")


def _n(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    return f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else f"{size:,}"


async def table_stats(db: Database) -> dict[str, object]:
    """The messages table after the run: size, dead rows, how many updates were HOT."""
    admin = await asyncpg.connect(db.admin_dsn)
    try:
        row = await admin.fetchrow(
            "SELECT n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, n_tup_ins, n_tup_del, autovacuum_count, "
            "pg_total_relation_size(relid) AS total_bytes, pg_relation_size(relid) AS heap_bytes "
            "FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'messages'", SCHEMA,
        )
        return dict(row) if row else {}
    finally:
        await admin.close()
