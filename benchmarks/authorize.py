"""The authorization check with large allow-lists: ``python -m benchmarks.authorize``.

Every API function checks its stream against the caller's allow-list (``_authorize``). This times the cheapest
function that does nothing else, ``worker_extend`` on a message that does not exist, as roles allowed 1 stream,
571 streams (the most a role setting of 8,000 characters holds) and 1,000 and 10,000 streams (``stream_grants``),
checking the last stream of each list: p50 and p99 over ``--samples`` calls, and the ratio to 1 stream.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import asyncpg

from mcp_hotmesh._migrate import migrate
from mcp_hotmesh._roles import provision_role

from .common import percentile
from .db import database

SCHEMA = "authz"


async def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.authorize", description=__doc__)
    p.add_argument("--samples", type=int, default=2000)
    args = p.parse_args()
    with database() as db:
        admin = await asyncpg.connect(db.admin_dsn)
        try:
            await migrate(admin, SCHEMA)
            rows: list[tuple[int, str, float, float]] = []
            for size in (1, 571, 1000, 10_000):
                streams = [f"svc.tool_{i:05d}" if size > 1000 else f"svc.tool_{i:04d}" for i in range(size)]
                role = await provision_role(admin, streams, "worker", schema=SCHEMA)
                conn = await asyncpg.connect(db.role_dsn(role.role, role.password))
                try:
                    stmt = await conn.prepare(f"SELECT {SCHEMA}.worker_extend($1, 0, $2, 1000)")
                    lease = uuid.uuid4()
                    for _ in range(100):
                        await stmt.fetchval(streams[-1], lease)
                    lat = []
                    for _ in range(args.samples):
                        t0 = time.perf_counter()
                        await stmt.fetchval(streams[-1], lease)
                        lat.append((time.perf_counter() - t0) * 1000)
                finally:
                    await conn.close()
                stored = "role setting" if len(",".join(streams)) <= 8000 else "stream_grants"
                rows.append((size, stored, percentile(lat, 0.5) or 0.0, percentile(lat, 0.99) or 0.0))
        finally:
            await admin.close()
    base = rows[0][2]
    print(f"{'streams':>8} {'stored in':>14} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs 1':>9}")
    for size, stored, p50, p99 in rows:
        print(f"{size:>8} {stored:>14} {p50:>8.3f} {p99:>8.3f} {p50 / base:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
