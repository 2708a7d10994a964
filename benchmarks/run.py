"""The call-path benchmark, in one run on one database: ``python -m benchmarks.run`` (``--help`` for options).

Five parts, each also as a ratio to its baseline:

1. end to end: ``mcp.Client`` → gateway (caller role) → PostgreSQL → secured worker (worker role, a separate
   process) → back, a no-op tool, at 1 and 16 concurrent calls;
2. the floor: the same round trip as bare SQL with asyncpg, at the same concurrencies;
3. PGQueuer as RPC (enqueue + ``CompletionWatcher``) at the same concurrencies, and PGQueuer's drain;
4. our drain: N queued calls answered by one worker;
5. scale: claim latency with 10k, 100k and 1M calls waiting; memory (RSS) of gateway and worker over a long run.

Parts 1 to 3 run interleaved, in rounds (floor, ours, PGQueuer; then again), so a noisy machine's slow minute
falls on all of them alike. The database is the embedded PostgreSQL in a temporary directory (default settings:
durable commits), or ``HOTMESH_BENCH_DSN`` (a superuser's DSN). Results: a table on stdout, and JSON in
``benchmarks/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from . import drain, e2e, floor, pgq, scale
from .common import Result, closed_loop, compare, loop_result, percentile, ratio_text, rss_mb
from .db import Database, database

RESULTS = Path(__file__).with_name("results")
CONCURRENCIES = (1, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="recorded seconds per measurement and round (4)")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds before each measurement (1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of parts 1-3 (3)")
    p.add_argument("--drain", type=int, default=20_000, help="calls (and PGQueuer jobs) queued for the drains (20000)")
    p.add_argument("--scale", default="10000,100000,1000000",
                   help="waiting calls for the claim-latency steps, comma-separated (10000,100000,1000000)")
    p.add_argument("--samples", type=int, default=300, help="claims measured at each scale step (300)")
    p.add_argument("--long", type=float, default=60.0, help="seconds of the memory run at 16 calls (60)")
    p.add_argument("--worker-concurrency", type=int, default=64,
                   help="handlers a worker runs at once, end to end and drain (64)")
    p.add_argument("--in-process-worker", action="store_true",
                   help="run the end-to-end worker inside this process (default: `mcp-hotmesh worker` subprocess)")
    p.add_argument("--no-pgqueuer", action="store_true", help="skip PGQueuer (also skipped when not installed)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (seconds, not minutes)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 0.3, 0.1, 1
        args.drain, args.scale, args.samples, args.long = 200, "500,1500", 10, 1.0
    args.sizes = [int(s) for s in str(args.scale).split(",") if s.strip()]
    return args


# --------------------------------------------------------------------------------------------- machine

def machine(db: Database, server: dict[str, str]) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_gib, 1),
        "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
        "postgres": server.get("server_version", "?"), "database": db.description, "settings": server,
        "mcp": version("mcp"), "asyncpg": version("asyncpg"), "pgqueuer": version("pgqueuer"),
        "git_commit": commit, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


async def server_settings(db: Database) -> dict[str, str]:
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            ["server_version", "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers",
             "full_page_writes", "max_connections"],
        )
        return {r["name"]: r["setting"] for r in rows}
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------ parts

class Pooled:
    """Rounds of one measurement, pooled: all calls over all recorded time; percentiles over all latencies."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.latencies: list[float] = []

    def add(self, outcome: tuple[int, float, list[float]]) -> None:
        self.count += outcome[0]
        self.seconds += outcome[1]
        self.latencies += outcome[2]

    def result(self, part: str, name: str, concurrency: int, note: str) -> Result:
        rate = self.count / self.seconds if self.seconds else None
        return Result(part, name, concurrency, self.count, self.seconds, rate, percentile(self.latencies, 0.5),
                      percentile(self.latencies, 0.99), note=note)


async def interleaved(args: argparse.Namespace, db: Database, roles: e2e.Roles, stack: e2e.Stack,
                      mcp_clients: list[Any], floor_dsn: str, pgq_op: Any) -> list[Result]:
    """Parts 1-3 at each concurrency, in rounds."""
    pooled: dict[tuple[str, int], Pooled] = {}
    timing = {"seconds": args.seconds, "warmup": args.warmup}
    for rnd in range(args.rounds):
        for c in CONCURRENCIES:
            log(f"round {rnd + 1}/{args.rounds}, {c} concurrent: floor")
            pooled.setdefault(("floor", c), Pooled()).add(await _floor(floor_dsn, c, **timing))
            log(f"round {rnd + 1}/{args.rounds}, {c} concurrent: end to end")
            pooled.setdefault(("e2e", c), Pooled()).add(
                await closed_loop(lambda i: e2e.call(stack.clients[i]), c, **timing))
            log(f"round {rnd + 1}/{args.rounds}, {c} concurrent: MCP layer alone")
            pooled.setdefault(("mcp", c), Pooled()).add(
                await closed_loop(lambda i: e2e.call(mcp_clients[i]), c, **timing))
            if pgq_op is not None:
                log(f"round {rnd + 1}/{args.rounds}, {c} concurrent: PGQueuer RPC")
                pooled.setdefault(("pgq", c), Pooled()).add(await closed_loop(pgq_op, c, **timing))
    where = "in this process" if args.in_process_worker else "`mcp-hotmesh worker` subprocess"
    results = []
    for c in CONCURRENCIES:
        results.append(pooled[("e2e", c)].result(
            "1 e2e", "MCP tool call end to end", c,
            f"mcp.Client in-process -> gateway (caller role) -> PG -> worker ({where}, worker role) -> back"))
    for c in CONCURRENCIES:
        results.append(pooled[("mcp", c)].result(
            "1 e2e", "MCP layer alone (no queue)", c,
            "the same McpGateway and in-process clients, its engine answering at once: the gateway's ceiling"))
    for c in CONCURRENCIES:
        results.append(pooled[("floor", c)].result("2 floor", "bare SQL round trip", c,
                                                   "insert; claim SKIP LOCKED; done+response; read"))
    if pgq_op is not None:
        for c in CONCURRENCIES:
            results.append(pooled[("pgq", c)].result(
                "3 pgqueuer", "PGQueuer RPC (enqueue + CompletionWatcher)", c,
                "QueueManager defaults, subprocess; watcher debounce 1 ms"))
    return results


async def _floor(dsn: str, concurrency: int, *, seconds: float, warmup: float) -> tuple[int, float, list[float]]:
    return await floor.run(dsn, concurrency, seconds=seconds, warmup=warmup)


async def memory_run(args: argparse.Namespace, stack: e2e.Stack) -> Result:
    """16 concurrent calls for ``args.long`` seconds; RSS of the gateway (this process, with its MCP clients) and
    the worker, every second. Flat: the second half grows by less than 5% (or 2 MiB)."""
    samples: list[tuple[float, float, float]] = []
    done = asyncio.Event()

    async def sample() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            samples.append((time.perf_counter() - t0, rss_mb(), rss_mb(stack.worker_pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)

    sampler = asyncio.create_task(sample())
    try:
        outcome = await closed_loop(lambda i: e2e.call(stack.clients[i]), 16, seconds=args.long, warmup=0,
                                    keep=False)
    finally:
        done.set()
        await sampler
    half = [s for s in samples if s[0] >= samples[-1][0] / 2] or samples
    growth = {
        "gateway": half[-1][1] - half[0][1],
        "worker": half[-1][2] - half[0][2],
    }
    flat = all(g <= max(2.0, 0.05 * half[0][i + 1]) for i, g in enumerate(growth.values()))
    r = loop_result("5 scale", f"memory over {args.long:g} s at 16 calls", 16, outcome)
    r.note = (f"RSS MiB gateway {samples[0][1]:.1f} -> {samples[-1][1]:.1f}, worker {samples[0][2]:.1f} -> "
              f"{samples[-1][2]:.1f}; 2nd half +{growth['gateway']:.1f} / +{growth['worker']:.1f}")
    r.extra = {"rss_samples": samples, "second_half_growth_mib": growth, "flat": flat}
    return r


# ----------------------------------------------------------------------------------------------- output

def log(text: str) -> None:
    sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: list[Result]) -> str:
    head = ("part", "what", "conc", "calls", "calls/s", "p50 ms", "p99 ms", "vs floor", "vs PGQueuer",
            "vs MCP alone")
    rows = [head]
    for r in results:
        rows.append((r.part, r.name, "-" if r.concurrency is None else str(r.concurrency), f"{r.count:,}",
                     _f(r.rate, 0), _f(r.p50_ms), _f(r.p99_ms), ratio_text(r, "floor"), ratio_text(r, "pgqueuer"),
                     ratio_text(r, "mcp")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets(results: list[Result]) -> list[dict[str, Any]]:
    by = {(r.part, r.concurrency, r.name): r for r in results if not r.name.startswith("MCP layer")}

    def find(part: str, c: int | None = None, name: str | None = None) -> Result | None:
        for (p, cc, n), r in by.items():
            if p == part and (c is None or cc == c) and (name is None or n.startswith(name)):
                return r
        return None

    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": what, "value": value, "goal": goal,
                    "met": None if value is None else met})

    e16, f16 = find("1 e2e", 16), find("2 floor", 16)
    v = e16.rate / f16.rate if e16 and f16 and e16.rate and f16.rate else None
    add("end to end at 16 calls, calls/s over the floor's", v, ">= 0.90", v is not None and v >= 0.9)
    e1, f1 = find("1 e2e", 1), find("2 floor", 1)
    v = e1.p50_ms / f1.p50_ms if e1 and f1 and e1.p50_ms and f1.p50_ms else None
    add("end to end p50 at 1 call over the floor's", v, "<= 1.20", v is not None and v <= 1.2)
    d, pd = find("4 drain"), find("3 pgqueuer", name="PGQueuer drain")
    v = d.rate / pd.rate if d and pd and d.rate and pd.rate else None
    add("drain calls/s over PGQueuer's drain", v, ">= 1.00", v is not None and v >= 1.0)
    claims = [r for r in results if r.part == "5 scale" and r.name.startswith("claim")]
    v = claims[-1].p50_ms / claims[0].p50_ms if len(claims) > 1 and claims[0].p50_ms and claims[-1].p50_ms else None
    add(f"claim p50 with {claims[-1].extra.get('waiting') if claims else '?'} waiting over "
        f"{claims[0].extra.get('waiting') if claims else '?'}", v, "<= 1.50 (flat)", v is not None and v <= 1.5)
    m = find("5 scale", name="memory")
    g = m.extra.get("second_half_growth_mib") if m else None
    add("memory growth in the 2nd half of the long run, MiB (gateway, worker)",
        max(g.values()) if g else None, "<= max(2 MiB, 5%)", bool(m and m.extra.get("flat")))
    return out


# ------------------------------------------------------------------------------------------------- main

async def main(args: argparse.Namespace) -> dict[str, Any]:
    use_pgq = not args.no_pgqueuer and pgq.available()
    if not use_pgq:
        log("PGQueuer parts skipped" + ("" if args.no_pgqueuer else " (pip install -e '.[bench]')"))
    started = time.perf_counter()
    with database() as db:
        settings = await server_settings(db)
        info = machine(db, settings)
        roles = await e2e.prepare(db)
        floor_dsn = await floor.setup(db)
        pgq_dsn = await pgq.setup(db) if use_pgq else None
        results: list[Result] = []
        async with contextlib.AsyncExitStack() as es:
            log("starting the end-to-end stack (worker, gateway, 16 MCP clients)")
            stack = await es.enter_async_context(e2e.stack(
                db, roles, lanes=max(CONCURRENCIES), in_process=args.in_process_worker,
                worker_concurrency=args.worker_concurrency))
            pgq_op = None
            async with contextlib.AsyncExitStack() as pgq_stack:
                if pgq_dsn is not None:
                    await pgq_stack.enter_async_context(pgq.worker_process(pgq_dsn))
                    pgq_op = await pgq_stack.enter_async_context(pgq.rpc_client(pgq_dsn))
                mcp_clients = await pgq_stack.enter_async_context(e2e.mcp_only(max(CONCURRENCIES)))
                results += await interleaved(args, db, roles, stack, mcp_clients, floor_dsn, pgq_op)
            if pgq_dsn is not None:
                log(f"PGQueuer drain of {args.drain}")
                results.append(await pgq.drain(pgq_dsn, args.drain))
            log(f"our drain of {args.drain}")
            results.append(await drain.run(db, roles, args.drain, concurrency=args.worker_concurrency))
            log(f"memory run: {args.long:g} s at 16 calls")
            memory = await memory_run(args, stack)
        log(f"claim latency with {', '.join(map(str, args.sizes))} waiting")
        results += await scale.claim_latency(db, roles, args.sizes, samples=args.samples)
        results.append(memory)
        info["messages_table_after"] = await scale.table_stats(db)
    by = {(r.part, r.concurrency): r for r in results if not r.name.startswith("MCP layer")}
    mcp_alone = {r.concurrency: r for r in results if r.name.startswith("MCP layer")}
    for r in results:
        if r.part in ("1 e2e", "3 pgqueuer") and r.concurrency is not None:
            compare(r, by.get(("2 floor", r.concurrency)), "floor")
        if r.part == "1 e2e" and not r.name.startswith("MCP layer"):
            compare(r, by.get(("3 pgqueuer", r.concurrency)), "pgqueuer")
            compare(r, mcp_alone.get(r.concurrency), "mcp")
        if r.part == "4 drain":
            compare(r, by.get(("3 pgqueuer", None)), "pgqueuer")
    claims = [r for r in results if r.part == "5 scale" and r.name.startswith("claim")]
    for r in claims[1:]:
        if r.p50_ms and claims[0].p50_ms:
            r.note += f"; p50 {r.p50_ms / claims[0].p50_ms:.2f}x the first step's"
    return {"machine": info, "results": [r.as_json() for r in results], "targets": targets(results),
            "seconds": time.perf_counter() - started, "options": {k: str(v) for k, v in vars(args).items()}}


def report(data: dict[str, Any]) -> str:
    m = data["machine"]
    results = [Result(**r) for r in data["results"]]
    lines = [
        f"mcp-hotmesh call-path benchmark, {m['date']} (commit {m['git_commit'] or '?'})",
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB; PostgreSQL {m['postgres']} "
        f"(fsync={m['settings'].get('fsync')}, synchronous_commit={m['settings'].get('synchronous_commit')}); "
        f"Python {m['python']}, mcp {m['mcp']}, pgqueuer {m['pgqueuer']}",
        "",
        table(results),
        "",
        "notes:",
        *[f"  {r.part} {r.name}{'' if r.concurrency is None else f' c={r.concurrency}'}: {r.note}"
          for r in results if r.note],
        "",
        "targets:",
    ]
    for t in data["targets"]:
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        lines.append(f"  {state:8s} {t['target']}: {_f(t['value'])} (goal {t['goal']})")
    lines.append(f"\ntotal {data['seconds']:.0f} s")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = asyncio.run(main(args))
    text = report(data)
    sys.stdout.write(text + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"bench-{stamp}{'-quick' if args.quick else ''}.json", "latest.json"):
        (args.out / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    log(f"JSON written to {args.out / 'latest.json'}")
    return data


if __name__ == "__main__":
    run()
