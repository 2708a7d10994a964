"""Where a call's time goes: ``python -m benchmarks.profile`` (``--help``).

For the floor and for end-to-end calls at 1 and 16 concurrent calls, it reports:

* CPU per call of each process (the gateway with its MCP clients, the worker, all PostgreSQL processes), from
  ``/proc``: what the machine spends, whatever the waiting;
* the statements the gateway and the worker send, with how many calls each carried and how long each took as
  the sender saw it (the worker's numbers come from the worker process, through a wrapper script);
* the server's own time per statement, nested statements inside the functions included (``pg_stat_statements``,
  loaded into the embedded server for this run; not with ``HOTMESH_BENCH_DSN``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from mcp_hotmesh import _embedded as embedded
from mcp_hotmesh._streams import CallerAPI

from . import e2e, floor
from .common import closed_loop, loop_result
from .db import Database, database

TICK = os.sysconf("SC_CLK_TCK")
WRAPPER = Path(__file__).with_name("_profile_worker.py")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def postgres_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "postgres":
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def cpu_snapshot(worker_pid: int | None) -> dict[str, float]:
    snap = {"gateway (with MCP clients)": cpu_seconds(os.getpid()),
            "postgres (all processes)": sum(cpu_seconds(p) for p in postgres_pids())}
    if worker_pid is not None and worker_pid != os.getpid():
        snap["worker"] = cpu_seconds(worker_pid)
    return snap


class Timings:
    """Per-method (statement) timings of an API object, as its sender sees them."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[int, float]]] = {}

    def wrap(self, cls: type, name: str, size: Callable[[tuple[Any, ...], Any], int]) -> None:
        original = getattr(cls, name)

        async def timed(api: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            value = await original(api, *args, **kwargs)
            self.rows.setdefault(name, []).append((size(args, value), (time.perf_counter() - t0) * 1000))
            return value

        setattr(cls, name, timed)

    def summary(self, seconds: float) -> list[dict[str, Any]]:
        return [{"statement": name, "sent": len(v), "calls per statement": statistics.mean(x[0] for x in v),
                 "p50 ms": statistics.median(x[1] for x in v), "busy %": sum(x[1] for x in v) / seconds / 10}
                for name, v in sorted(self.rows.items()) if v]


async def with_pg_stat_statements(db: Database) -> bool:
    """Load pg_stat_statements into the embedded server (a restart) and track nested statements."""
    if os.environ.get("HOTMESH_BENCH_DSN"):
        return False
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        data_dir = await conn.fetchval("SHOW data_directory")
        await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
    finally:
        await conn.close()
    await asyncio.to_thread(embedded._run, ["pg_ctl", "-D", data_dir, "-w", "-m", "fast", "restart"])
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()
    return True


async def statements(db: Database, calls: int, top: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT toplevel, calls, total_exec_time, mean_exec_time, rows, query FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC LIMIT $1", top,
        )
    finally:
        await conn.close()
    return [{"top level": r["toplevel"], "runs": r["calls"], "mean ms": r["mean_exec_time"],
             "us per call": r["total_exec_time"] * 1000 / max(calls, 1),
             "query": " ".join(r["query"].split())[:100]} for r in rows]


async def reset_statements(db: Database) -> None:
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def measure(name: str, op: Callable[[int], Awaitable[None]], concurrency: int, seconds: float,
                  worker_pid: int | None, db: Database, pgss: bool, gateway_timings: Timings | None,
                  top: int) -> dict[str, Any]:
    await closed_loop(op, concurrency, seconds=1.0, warmup=0.5)
    if pgss:
        await reset_statements(db)
    if gateway_timings is not None:
        gateway_timings.rows.clear()
    stats_file = Path(os.environ.get("HOTMESH_PROFILE_WORKER_STATS", "/nonexistent"))
    _read_and_remove(stats_file)
    before, t0 = cpu_snapshot(worker_pid), time.perf_counter()
    outcome = await closed_loop(op, concurrency, seconds=seconds, warmup=0)
    after, elapsed = cpu_snapshot(worker_pid), time.perf_counter() - t0
    r = loop_result("profile", name, concurrency, outcome)
    report: dict[str, Any] = {
        "what": name, "concurrency": concurrency, "calls/s": r.rate, "p50 ms": r.p50_ms, "p99 ms": r.p99_ms,
        "cpu us per call": {k: (after[k] - before[k]) * 1e6 / max(r.count, 1) for k in before},
        "cpu % of one core": {k: (after[k] - before[k]) / elapsed * 100 for k in before},
    }
    if gateway_timings is not None:
        report["gateway statements"] = gateway_timings.summary(seconds)
    if worker_pid is not None and worker_pid != os.getpid():
        os.kill(worker_pid, 10)  # SIGUSR1: the wrapper writes its timings
        for _ in range(50):
            await asyncio.sleep(0.05)
            worker_stats = _read_and_remove(stats_file)
            if worker_stats is not None:
                report["worker statements"] = worker_stats
                break
    if pgss:
        report["server statements"] = await statements(db, r.count, top)
    return report


def _read_and_remove(path: Path) -> Any:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    path.unlink(missing_ok=True)
    return value


def show(report: dict[str, Any]) -> None:
    print(f"\n=== {report['what']}, {report['concurrency']} concurrent: {report['calls/s']:,.0f} calls/s, "
          f"p50 {report['p50 ms']:.2f} ms, p99 {report['p99 ms']:.2f} ms")
    for k, v in report["cpu us per call"].items():
        print(f"  cpu {k:28s} {v:7.0f} us/call  ({report['cpu % of one core'][k]:.0f}% of a core)")
    for key in ("gateway statements", "worker statements"):
        for s in report.get(key, []):
            print(f"  {key.split()[0]:8s} {s['statement']:22s} {s['sent']:6d} sent, {s['calls per statement']:5.1f} "
                  f"calls each, p50 {s['p50 ms']:.2f} ms, busy {s['busy %']:.0f}%")
    for s in report.get("server statements", []):
        print(f"  server {'top' if s['top level'] else 'in fn':5s} {s['runs']:7d} runs  {s['mean ms']:7.3f} ms  "
              f"{s['us per call']:6.0f} us/call  {s['query']}")


async def main(args: argparse.Namespace) -> None:
    os.environ["HOTMESH_BENCH_WORKER_WRAPPER"] = str(WRAPPER)
    stats_path = Path(tempfile.mkdtemp(prefix="hotmesh-profile-")) / "worker.json"
    os.environ["HOTMESH_PROFILE_WORKER_STATS"] = str(stats_path)
    timings = Timings()
    timings.wrap(CallerAPI, "call_many", lambda a, v: len(a[0]))
    timings.wrap(CallerAPI, "results", lambda a, v: len(a[0]))
    reports = []
    with database() as db:
        pgss = await with_pg_stat_statements(db)
        roles = await e2e.prepare(db)
        floor_dsn = await floor.setup(db)
        for c in args.concurrency:
            conns = [await asyncpg.connect(floor_dsn) for _ in range(c)]

            async def floor_op(lane: int, conns: list[asyncpg.Connection] = conns) -> None:
                await floor_once(conns[lane])

            try:
                reports.append(await measure("floor (bare SQL)", floor_op, c, args.seconds, None, db, pgss, None,
                                             args.top))
            finally:
                for conn in conns:
                    await conn.close()
        async with e2e.stack(db, roles, lanes=max(args.concurrency)) as stack:
            for c in args.concurrency:
                reports.append(await measure(
                    "end to end (MCP)", lambda i: e2e.call(stack.clients[i]), c, args.seconds,
                    stack.worker_pid, db, pgss, timings, args.top))
    for report in reports:
        show(report)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2, default=str))


async def floor_once(conn: asyncpg.Connection) -> None:
    await conn.fetchval(floor.INSERT, "bench", "{}")
    row = await conn.fetchrow(floor.CLAIM, "bench")
    while row is None:
        row = await conn.fetchrow(floor.CLAIM, "bench")
    await conn.execute(floor.ANSWER, row[0], "{}")
    await conn.fetchval(floor.READ, row[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--top", type=int, default=15, help="server statements shown (15)")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
