"""What every part of the benchmark shares: closed-loop load, percentiles, results, the process's memory."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    """One line of the table."""

    part: str  # "1 e2e", "2 floor", ...
    name: str
    concurrency: int | None = None
    count: int = 0
    seconds: float = 0.0
    rate: float | None = None  # per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # see compare()
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of ``values``, nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


Op = Callable[[int], Awaitable[None]]


async def closed_loop(
    op: Op, concurrency: int, *, seconds: float, warmup: float, keep: bool = True
) -> tuple[int, float, list[float]]:
    """``concurrency`` lanes, each calling ``op(lane)`` back to back: ``warmup`` seconds unrecorded, then
    ``seconds`` recorded. Returns (calls completed, elapsed seconds, latencies in ms; none unless ``keep``)."""
    latencies: list[float] = []
    count = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    record_from = start + warmup
    end = record_from + seconds
    t_first: float | None = None
    t_last = record_from

    async def lane(i: int) -> None:
        nonlocal count, t_first, t_last
        while True:
            t0 = time.perf_counter()
            now = loop.time()
            if now >= end:
                return
            await op(i)
            t1 = time.perf_counter()
            if now >= record_from:
                if keep:
                    latencies.append((t1 - t0) * 1000)
                count += 1
                t_last = loop.time()
                if t_first is None:
                    t_first = now

    await asyncio.gather(*(lane(i) for i in range(concurrency)))
    elapsed = max(t_last - (t_first if t_first is not None else record_from), 1e-9)
    return count, elapsed, latencies


def loop_result(part: str, name: str, concurrency: int, outcome: tuple[int, float, list[float]],
                **kwargs: Any) -> Result:
    count, elapsed, lat = outcome
    return Result(part, name, concurrency, count, elapsed, count / elapsed, percentile(lat, 0.5),
                  percentile(lat, 0.99), **kwargs)


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process (this one by default), in MiB, from /proc."""
    path = f"/proc/{pid or os.getpid()}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def compare(result: Result, baseline: Result | None, key: str) -> None:
    """Record ``result`` against ``baseline`` under ``key`` ("floor", "pgqueuer"): its rate over the baseline's
    (higher is better) and its p50 over the baseline's (lower is better)."""
    if baseline is None:
        return
    ratios: dict[str, float] = {}
    if result.rate and baseline.rate:
        ratios["rate"] = result.rate / baseline.rate
    if result.p50_ms and baseline.p50_ms:
        ratios["p50"] = result.p50_ms / baseline.p50_ms
    result.ratios[key] = ratios


def ratio_text(result: Result, key: str) -> str:
    r = result.ratios.get(key)
    if not r:
        return ""
    parts = []
    if "rate" in r:
        parts.append(f"{r['rate']:.2f}x rate")
    if "p50" in r:
        parts.append(f"{r['p50']:.2f}x p50")
    return ", ".join(parts)
