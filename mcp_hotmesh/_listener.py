"""LISTEN: one connection that hears a component's NOTIFY channels, re-established with backoff when it drops."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg

from ._postgres import connect
from ._retry import LOGIN_GRACE, Backoff
from .errors import ConnectionFailed, LoginRefused

log = logging.getLogger(__name__)

Handler = Callable[[str, str], None]


class Listener:
    """One LISTEN connection per component, re-established with backoff when it drops.

    ``handler(channel, payload)`` runs for each notification. NOTIFY is only a hint to look again: any role
    can NOTIFY any channel, so a handler always re-reads through the API functions. After a reconnect the
    ``on_reconnect`` callback runs, because notifications sent while disconnected are lost. Given ``on_refused``,
    a login PostgreSQL refuses for ``LOGIN_GRACE`` seconds ends the listener, and ``on_refused`` is told why.

    ``pause`` stops hearing the channels and ``resume`` hears them again, keeping the connection (a parked worker
    process, ``_pulse``): PostgreSQL 18 and earlier wake every listening session at each NOTIFY, heard or not.
    """

    def __init__(
        self,
        dsn: str,
        channels: list[str],
        handler: Handler,
        *,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        on_refused: Callable[[LoginRefused], None] | None = None,
        check_interval: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._on_refused = on_refused
        self._channels = list(channels)
        self._handler = handler
        self._on_reconnect = on_reconnect
        self._check_interval = check_interval
        self.connected = anyio.Event()
        self.reconnects = 0
        self.paused = False
        self._conn: asyncpg.Connection | None = None
        self._using = anyio.Lock()  # one statement at a time on the connection

    async def pause(self) -> None:
        """Stop hearing the channels (``UNLISTEN *``); a reconnect keeps it so."""
        self.paused = True
        await self._apply()

    async def resume(self) -> None:
        """Hear the channels again: all of them in one round trip."""
        self.paused = False
        await self._apply()

    async def _apply(self) -> None:
        listen = "; ".join('LISTEN "{}"'.format(c.replace('"', '""')) for c in self._channels)
        async with self._using:
            if self._conn is None:
                return  # applied when it connects
            try:
                await self._conn.execute("UNLISTEN *" if self.paused else listen)
            except Exception as exc:  # a lost connection: the reconnect applies it
                log.debug("LISTEN connection: %s failed (%s)", "pause" if self.paused else "resume",
                          type(exc).__name__)

    async def run(self) -> None:
        """Listen until cancelled."""
        backoff = Backoff()
        first = True
        refused_since: float | None = None
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._dsn)
                lost = anyio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in self._channels:
                    await conn.add_listener(channel, self._dispatch)
                async with self._using:
                    self._conn = conn
                    if self.paused:
                        await conn.execute("UNLISTEN *")
                self.connected.set()
                if not first:
                    self.reconnects += 1
                    log.info("LISTEN connection re-established")
                    if self._on_reconnect is not None:
                        await self._on_reconnect()
                first = False
                refused_since = None
                backoff.succeeded()
                while not lost.is_set():
                    with anyio.move_on_after(self._check_interval):
                        await lost.wait()
                    if not lost.is_set():  # a silently dead connection shows up here
                        with anyio.fail_after(self._check_interval):
                            async with self._using:
                                await conn.execute("SELECT 1")
                raise ConnectionFailed("the server ended the LISTEN connection")
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # reconnect on anything: the listener must outlive the server
                if isinstance(exc, LoginRefused) and self._on_refused is not None:
                    # revoked, or its password rotated: after the grace, the owner stops (a worker behind a
                    # transaction pooler learns it here first: the pooler keeps its server connections)
                    refused_since = anyio.current_time() if refused_since is None else refused_since
                    if anyio.current_time() - refused_since >= LOGIN_GRACE:
                        self._on_refused(exc)
                        return
                delay, level = backoff.failed(exc)
                log.log(level, "LISTEN connection lost (%s); retrying in %.1fs", type(exc).__name__, delay)
            finally:
                self._conn = None
                self.connected = anyio.Event() if self.connected.is_set() else self.connected
                if conn is not None:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await anyio.sleep(delay)

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        try:
            self._handler(channel, str(payload))
        except Exception:
            log.exception("notification handler failed")
