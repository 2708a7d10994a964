"""The pulse of a worker process: one heartbeat and one fallback poll for all its consumers on one database.

However many topics a process serves, it sends one ``worker_alive`` every ``heartbeat_interval`` (each counts for
three) and one ``worker_pending`` every ``poll_interval``, both naming all its streams; the poll wakes only the
consumers whose streams have work NOTIFY did not announce (a missed NOTIFY, a restarted server, a retry that came
due, another worker's expired lease). Both intervals are jittered (±20%) so that processes started together do
not poll in step. Measured with 1,000 topics in one process: 272 idle statements per second with a heartbeat and a
poll per topic, about one with these (``python -m benchmarks.sweep``).

Parking. PostgreSQL 18 and earlier wake every listening session of the database at each commit that sent a
NOTIFY, heard or not, and each woken session runs a transaction (measured on 2 cores: 16 processes on one stream
ran 5.9 transactions per call instead of 1.6 with one; ``sql/functions.sql``, parking). So at each poll, a
process that has listened ``park_after`` seconds asks to park (``worker_park``). Unless it is needed (the
processes of its role before it lack the handlers for twice the calls waiting and running, or a call waited
a second), new calls stop waking it, and it stops listening (``Listener.pause``) once its running handlers are
done (until then it hears their cancellations). Instead of the poll it asks every second whether it is needed
again; when it is, it listens again before it claims: nothing sent from then on is missed, and what was sent
before is claimed.

A schema not yet migrated to these functions (a worker upgraded before its database) is served the earlier way:
``worker_heartbeat`` in chunks of 1,000 streams, a poll that wakes every consumer, and no parking; the next round
tries the new functions again, so a ``migrate`` while the worker runs switches it over.
"""

from __future__ import annotations

import logging

import anyio

from ._consumer import Consumer
from ._listener import Listener
from ._retry import LOGIN_GRACE, Backoff, jitter
from ._streams import WorkerAPI
from .errors import HotMeshError, LoginRefused, SchemaOutdated

log = logging.getLogger(__name__)

PARKED_POLL = 1.0
"""Seconds between a parked process's questions whether it is needed (at most ``poll_interval``)."""


class Pulse:
    """Heartbeat and fallback poll for ``consumers`` (all on ``api``'s database, one consumer id)."""

    def __init__(self, api: WorkerAPI, consumers: list[Consumer], *, consumer_id: str, poll_interval: float,
                 heartbeat_interval: float, park_after: float | None = None, capacity: int = 1) -> None:
        self.api = api
        self.capacity = capacity
        self.park_after = park_after  # None: never park
        self.listener: Listener | None = None  # the process's LISTEN connection on this database (Worker._listen)
        self.parked = False
        self.consumers = {c.topic: c for c in consumers}
        self.consumer_id = consumer_id
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self._streams = sorted(self.consumers)
        self._workflows = [self.consumers[s].workflows for s in self._streams]
        self._beat = anyio.Lock()  # a heartbeat never lands after the goodbye; one write of our rows at a time
        self._gone = False
        self._listening_since = anyio.current_time()

    async def heartbeat(self) -> None:
        """Tell gateways every consumer is live, for three heartbeat intervals: one statement."""
        ttl_ms = int(self.heartbeat_interval * 3000)
        try:
            await self.api.alive(self.consumer_id, ttl_ms, self._streams, self._workflows)
        except SchemaOutdated:
            for start in range(0, len(self._streams), 1000):
                await self.api.heartbeat(self._streams[start:start + 1000], self.consumer_id, ttl_ms)

    async def poll(self) -> None:
        """Wake the consumers whose streams have work now: one statement."""
        try:
            pending = await self.api.pending(self._streams)
        except SchemaOutdated:
            pending = self._streams
        for stream in pending:
            consumer = self.consumers.get(stream)
            if consumer is not None:
                consumer.wake()

    def _busy(self) -> bool:
        return any(c.busy for c in self.consumers.values())

    async def _park(self, park: bool) -> bool | None:
        """``worker_park`` for all the streams: whether parked now; None after the goodbye."""
        async with self._beat:
            if self._gone:
                return None
            return await self.api.park(self.consumer_id, self._streams, park, self.capacity)

    async def maybe_park(self) -> None:
        """Park if the process has listened ``park_after`` seconds and is not needed."""
        if (self.park_after is None or self.listener is None or self.parked
                or anyio.current_time() - self._listening_since < self.park_after):
            return
        try:
            parked = await self._park(True)
        except SchemaOutdated:  # a schema without worker_park: listen, as before
            self.park_after = None
            return
        if not parked:  # needed: ask again after another park_after
            self._listening_since = anyio.current_time()
            return
        self.parked = True
        log.debug("parked: no new calls while other processes serve %d stream(s)", len(self._streams))
        await self._hear_only_own()

    async def while_parked(self) -> None:
        """Listen again and claim if the database says the process is needed; else hear only its own calls."""
        if await self._park(True) is False:
            await self.unpark()
        else:
            await self._hear_only_own()

    async def _hear_only_own(self) -> None:
        """A parked process gets no new calls; it listens only while a handler of its runs (one that ran when it
        parked, or a retry come due), for that call's cancellation and answers."""
        assert self.listener is not None
        if self._busy() == self.listener.paused:
            await (self.listener.resume() if self._busy() else self.listener.pause())

    async def unpark(self) -> None:
        """Listen again (``worker_park`` has said so in the database), then claim what waits."""
        assert self.listener is not None
        await self.listener.resume()
        self.parked = False
        self._listening_since = anyio.current_time()
        log.debug("listening again")
        for consumer in self.consumers.values():
            consumer.wake()

    async def goodbye(self) -> None:
        """No more heartbeats; gateways stop counting these consumers at once (``worker_goodbye``)."""
        async with self._beat:
            self._gone = True
            await self.api.goodbye(self.consumer_id)

    async def run_heartbeats(self) -> None:
        backoff = Backoff()
        while True:
            await anyio.sleep(jitter(self.heartbeat_interval, 0.8, 1.0))  # never later than promised
            async with self._beat:
                if self._gone:
                    return
                try:
                    await self.heartbeat()
                    if backoff.succeeded():
                        log.info("heartbeat works again")
                except HotMeshError as exc:
                    log.log(backoff.failed(exc)[1], "heartbeat failed: %s", exc)

    def _interval(self) -> float:
        """Seconds to the next poll: ``poll_interval``; a parked process asks each second whether it is needed,
        and one that may park asks no later than ``park_after`` (at least a second) after it may."""
        if self.park_after is None or self.listener is None:
            return self.poll_interval
        if self.parked:
            return min(self.poll_interval, PARKED_POLL)
        return min(self.poll_interval, max(self.park_after, PARKED_POLL))

    async def run_polls(self) -> None:
        """Poll at once (what waited before the process started), then every ``poll_interval`` (jittered).
        PostgreSQL refusing the login (revoked, or the password rotated) for ``LOGIN_GRACE`` seconds raises
        ``LoginRefused``: nothing the process does will change that."""
        backoff = Backoff(base=0.2, cap=min(5.0, max(self.poll_interval, 0.2)))
        refused_since: float | None = None
        while True:
            delay = jitter(self._interval(), 0.8, 1.2)
            try:
                if self.parked:
                    await self.while_parked()
                else:
                    await self.poll()
                    await self.maybe_park()
                refused_since = None
                if backoff.succeeded():
                    log.info("the fallback poll works again")
            except LoginRefused:
                refused_since = refused_since if refused_since is not None else anyio.current_time()
                if anyio.current_time() - refused_since >= LOGIN_GRACE:
                    raise
                delay = min(delay, 1.0)
            except HotMeshError as exc:
                delay, level = backoff.failed(exc)
                log.log(level, "the fallback poll failed (%s); retrying in %.1fs", exc, delay)
            await anyio.sleep(delay)
