"""One caller engine per caller role a gateway serves for its identities: made on the first request of an
identity acting as that role, logged in as that role with the password the identity configuration gives, and
closed when idle.

Each identity's calls then go through its own role's engine: the database scopes the catalog (``tools/list``),
the calls, their answers and their cancellation to that role, exactly as for a worker or a gateway logged in as
it. The SQL functions scope everything by ``session_user``, which only a login changes (``SET ROLE`` changes
``current_user``), so the gateway logs in as each role; the admin's login is never used for it.

Bounded: at most ``max_roles`` engines at once, each with a pool of at most ``pool_size`` connections and one
LISTEN connection; an engine with no call in flight for ``idle_seconds`` is closed. Each engine lives in a task of
its own (an engine's task group must be left by the task that entered it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import asyncpg
from pydantic import SecretStr

from ._caller import Engine
from ._config import WorkerCredentials, connection_dsn
from ._postgres import create_pool
from .errors import Busy, HotMeshError, PermissionDenied

log = logging.getLogger(__name__)


class RoleUnavailable(HotMeshError):
    """The gateway cannot act as an identity's caller role (no login configured, or the login is refused)."""


@dataclass(eq=False)
class _Slot:
    role: str
    engine: Engine | None = None
    pool: asyncpg.Pool | None = None
    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)


class RoleEngines:
    def __init__(
        self, base: Engine, base_dsn: str, logins: dict[str, SecretStr], *, max_roles: int = 16,
        pool_size: int = 4, idle_seconds: float = 300.0,
        on_tools_changed: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[str, asyncpg.Pool], Awaitable[None]] | None = None,
    ) -> None:
        self.base = base
        self.base_dsn = base_dsn
        self.logins = logins
        self.max_roles = max_roles
        self.pool_size = pool_size
        self.idle_seconds = idle_seconds
        self.on_tools_changed = on_tools_changed
        self.on_close = on_close
        self._slots: dict[str, _Slot] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host the engines and close idle ones, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            while True:
                await anyio.sleep(min(self.idle_seconds / 4, 10.0))
                self._close_idle(self.idle_seconds)

    def pool_of(self, role: str) -> asyncpg.Pool | None:
        slot = self._slots.get(role)
        return slot.pool if slot is not None and slot.ready.is_set() else None

    def engine_of(self, role: str) -> Engine | None:
        slot = self._slots.get(role)
        return slot.engine if slot is not None and slot.ready.is_set() else None

    @asynccontextmanager
    async def use(self, role: str) -> AsyncIterator[Engine]:
        """The engine of ``role`` (started if need be), held open while the block runs."""
        slot = await self._slot(role)
        slot.active += 1
        try:
            assert slot.engine is not None
            yield slot.engine
        finally:
            slot.active -= 1
            slot.last_used = time.monotonic()

    async def _slot(self, role: str) -> _Slot:
        slot = self._slots.get(role)
        if slot is None:
            if role not in self.logins:
                log.warning("an identity acts as caller role %s, which the identity configuration has no login for",
                            role)
                raise RoleUnavailable("this server has no login for your role; ask its administrator")
            if len(self._slots) >= self.max_roles:
                self._close_idle(0.0, one=True)
                if len(self._slots) >= self.max_roles:
                    raise Busy("this server is acting for too many roles at once; try again shortly")
            slot = self._slots[role] = _Slot(role)
            assert self._tg is not None, "RoleEngines.run is not running"
            self._tg.start_soon(self._host, slot)
        await slot.ready.wait()
        if slot.error is not None:
            raise RoleUnavailable("this server cannot act as your role right now; ask its administrator")
        slot.last_used = time.monotonic()
        return slot

    def _close_idle(self, seconds: float, *, one: bool = False) -> None:
        now = time.monotonic()
        idle = sorted((s for s in self._slots.values() if s.ready.is_set() and s.active == 0
                       and now - s.last_used >= seconds), key=lambda s: s.last_used)
        for slot in idle[:1] if one else idle:
            log.info("closing the idle engine of caller role %s", slot.role)
            self._slots.pop(slot.role, None)
            slot.stop.set()

    async def _host(self, slot: _Slot) -> None:
        credentials = WorkerCredentials(user=slot.role, password=self.logins[slot.role])
        dsn = connection_dsn(self.base_dsn, credentials)
        listen_dsn = connection_dsn(self.base.listen_dsn, credentials)
        try:
            try:
                pool = await create_pool(dsn, min_size=1, max_size=self.pool_size, pooler=self.base.pooler)
            except HotMeshError as exc:
                raise RoleUnavailable(str(exc)) from None
            slot.pool = pool
            try:
                engine = Engine(pool, schema=self.base.schema, role=slot.role, listen_dsn=listen_dsn, pool_dsn=dsn,
                                pooler=self.base.pooler, timeout=self.base.timeout,
                                max_args_bytes=self.base.max_args_bytes)
                engine.on_tools_changed = self.on_tools_changed
                try:
                    await engine.__aenter__()
                except PermissionDenied:
                    raise RoleUnavailable(f"{slot.role} is not a caller role of schema {self.base.schema}") from None
                try:
                    slot.engine = engine
                    slot.ready.set()
                    log.info("acting as caller role %s", slot.role)
                    await slot.stop.wait()
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        if self.on_close is not None:
                            await self.on_close(slot.role, pool)
                    await engine.__aexit__(None, None, None)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await pool.close()
        except Exception as exc:  # a bug too must answer the requests waiting for this engine, never hang them
            if isinstance(exc, HotMeshError):
                log.warning("cannot act as caller role %s: %s", slot.role, exc)
            else:
                log.exception("cannot act as caller role %s", slot.role)
            slot.error = exc
        finally:
            if self._slots.get(slot.role) is slot and (slot.error is not None or slot.stop.is_set()):
                del self._slots[slot.role]  # the next request tries again
            if slot.error is None and slot.engine is None:
                slot.error = RoleUnavailable("stopped")
            slot.ready.set()
