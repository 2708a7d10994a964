"""PGQueuer's worker for the RPC benchmark: a QueueManager with default settings serving the no-op entrypoint.

Run by ``benchmarks.pgq`` as ``python -m benchmarks.pgq_worker`` with ``BENCH_PGQ_DSN`` set; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal

from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.models import Job

from .pgq import ENTRYPOINT, connect


async def main() -> None:
    conn = await connect(os.environ["BENCH_PGQ_DSN"])
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(ENTRYPOINT)
    async def noop(job: Job) -> None:
        pass

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, qm.shutdown.set)
    try:
        await qm.run()
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
