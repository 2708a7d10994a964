"""Housekeeping every gateway and worker process runs beside its work, as its own scoped role: retention (the
finished calls of its streams are purged now and then, in bounded batches) and the watchdog (scoped sessions that
hold a transaction open too long, or an advisory lock, are ended). Both go through the stream API's
``<kind>_purge()`` and ``<kind>_watchdog()``.
"""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel

from ._retry import Backoff, jitter
from ._streams import CallerAPI, WorkerAPI
from .errors import HotMeshError

log = logging.getLogger(__name__)

WATCHDOG_INTERVAL = 3.0
"""How often a gateway or worker process runs the watchdog. A session that holds a transaction open on purpose
is ended within the schema's ``watchdog_idle_ms`` (5 s) plus this."""


async def retention_loop(api: WorkerAPI | CallerAPI, *, interval: float = 60.0, max_rounds: int = 20) -> None:
    """Purge every ``interval`` seconds (with jitter, so processes started together spread out), until
    cancelled. A full batch means more is waiting: go on at once, ``max_rounds`` batches at most per turn."""
    if interval <= 0:
        return
    backoff = Backoff()
    await anyio.sleep(jitter(min(interval, 10.0), 0.0, 1.0))
    while True:
        try:
            total = 0
            for _ in range(max_rounds):
                count = await api.purge()
                if count <= 0:
                    break
                total += count
                await anyio.lowlevel.checkpoint()
            if total:
                log.info("retention: purged %d finished call(s)", total)
            if backoff.succeeded():
                log.info("retention works again")
        except HotMeshError as exc:
            log.log(backoff.failed(exc)[1], "retention: purge failed: %s", exc)
        await anyio.sleep(jitter(interval, 0.8, 1.2))


async def watchdog_loop(api: WorkerAPI | CallerAPI, *, interval: float = WATCHDOG_INTERVAL) -> None:
    """Run the watchdog every ``interval`` seconds until cancelled; one log line per session it ends."""
    backoff = Backoff()
    while True:
        await anyio.sleep(jitter(interval, 0.8, 1.2))
        try:
            for ended in await api.watchdog():
                log.warning("watchdog: ended session %d of role %s: %s (transaction open %.1fs)",
                            ended.pid, ended.role, ended.reason, ended.seconds)
            if backoff.succeeded():
                log.info("the watchdog works again")
        except HotMeshError as exc:
            log.log(backoff.failed(exc)[1], "watchdog: %s", exc)
