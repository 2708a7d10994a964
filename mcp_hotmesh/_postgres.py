"""PostgreSQL plumbing: pools shared by task queue, the one place database errors are translated, LISTEN.

Nothing outside this module catches an asyncpg exception: ``translated()`` turns each into a
``HotMeshError`` whose message is safe to show (no SQL, DSN or password).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import asyncpg

from ._common import clip
from ._config import Pooler, redact
from .errors import (
    Busy,
    ConfigError,
    ConnectionFailed,
    DatabaseError,
    HotMeshError,
    InvalidInput,
    LeaseLost,
    LoginRefused,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    QuotaExceeded,
    SchemaOutdated,
    ServerTooOld,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_SERVER_VERSION = 150000
APPLICATION_NAME = "mcp-hotmesh"

_OUR_CODES: dict[str, type[DatabaseError]] = {
    "HM001": LeaseLost,
    "HM002": InvalidInput,
    "HM003": PayloadTooLarge,
    "HM004": InvalidInput,
    "HM005": NotFound,
    "HM006": QuotaExceeded,
}
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.TooManyConnectionsError,
    # a connection left mid-operation when the server went away ("cannot switch to state ...; another
    # operation is in progress"): seen when PostgreSQL restarts under load
    asyncpg.InternalClientError,
    TimeoutError,
)


def translate(exc: BaseException, *, stream: str | None = None) -> HotMeshError:
    """The ``HotMeshError`` for a driver or OS error."""
    if isinstance(exc, HotMeshError):
        return exc
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        # a value the driver could not encode (not JSON-serialisable, NaN, the wrong type); the driver wraps the
        # encoder's own TypeError or ValueError in it, so a TypeError of ours is a bug and is not translated
        return InvalidInput("a value could not be sent to the database: it is not valid JSON or not the right type")
    if isinstance(exc, asyncpg.PostgresError):
        code = exc.sqlstate or ""
        if code in _OUR_CODES:
            return _OUR_CODES[code](str(exc))
        if code == "42501":
            if stream is not None and "stream" in str(exc):
                return PermissionDenied(f"permission denied for stream {_shown(stream)}")
            return PermissionDenied("permission denied: this role may not do that")
        if code == "55P03":  # lock_not_available: a scoped function's lock_timeout (SQL 003)
            return Busy("the database is busy with this request's rows (another session holds them); try again")
        if code == "53300":  # too_many_connections: the role's CONNECTION LIMIT, or the server's max_connections
            return ConnectionFailed(
                "PostgreSQL refused another connection: the role's connection limit (mcp-hotmesh limits ROLE "
                "--connection-limit N) or the server's max_connections is reached")
        if code == "42883":  # undefined_function: a schema an earlier version made, not migrated yet
            return SchemaOutdated("the database schema is older than this mcp-hotmesh: run mcp-hotmesh migrate")
        if code == "3D000":  # invalid_catalog_name, at login
            return ConnectionFailed(f"{exc}: check the database name in the DSN (the embedded server's is 'hotmesh')")
        if code == "3F000":  # invalid_schema_name
            return DatabaseError(f"{exc}: run mcp-hotmesh migrate for it, or give the right --schema")
        if code in ("28P01", "28000"):
            return LoginRefused("PostgreSQL refused the login: wrong user or password, or the role may not log in")
        if code == "08P01" and "authentication failed" in str(exc):
            # PgBouncer refuses a login as a protocol violation: "SASL authentication failed", "password
            # authentication failed"
            return LoginRefused("the connection pooler refused the login: wrong user or password, or the role may "
                                "not log in")
        if code == "22P05" or code.startswith("22"):
            return InvalidInput("the database refused a value (for example a \\u0000 character in a string)")
        if isinstance(exc, _CONNECTION_ERRORS):
            return ConnectionFailed("the connection to PostgreSQL was lost")
        log.debug("database error %s: %s", code, exc)
        return DatabaseError(f"the database could not complete the request (SQLSTATE {code})")
    if isinstance(exc, _CONNECTION_ERRORS):
        return ConnectionFailed("could not reach PostgreSQL")
    return DatabaseError("the database could not complete the request")


def _shown(stream: str) -> str:
    return repr(clip(stream, 83))


@contextlib.contextmanager
def translated(*, stream: str | None = None) -> Iterator[None]:
    """Re-raise any driver error inside the block as a ``HotMeshError``."""
    try:
        yield
    except HotMeshError:
        raise
    except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
        raise translate(exc, stream=stream) from exc


def is_transient(exc: BaseException) -> bool:
    """Worth trying again as it is: the connection was lost, or a lock wait timed out (``Busy``). A refused login
    is not: the password was rotated or the role revoked, and trying again changes nothing."""
    return isinstance(exc, (ConnectionFailed, Busy, *_CONNECTION_ERRORS)) and not isinstance(exc, LoginRefused)


async def check_server_version(conn: asyncpg.Connection) -> None:
    version = conn.get_server_version()
    number = version.major * 10000 + version.minor
    if number < MIN_SERVER_VERSION:
        raise ServerTooOld(
            f"mcp-hotmesh needs PostgreSQL 15 or newer; this server is {version.major}.{version.minor}"
        )


@contextlib.contextmanager
def _connecting(dsn: str) -> Iterator[None]:
    """Errors of a new connection, in words that name the DSN (without its password) and what to fix."""
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{redact(dsn)!r} is not a PostgreSQL URL: use postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    try:
        with translated():
            try:
                yield
            except asyncpg.ClientConfigurationError as exc:  # an InterfaceError too: caught before translated()
                raise ConfigError(f"invalid DSN {redact(dsn)!r}: {exc}") from None
    except ConnectionFailed as exc:
        cause = exc.__cause__
        if isinstance(cause, asyncpg.PostgresError):  # the server answered: a refused login, say
            raise
        detail = f" ({cause})" if isinstance(cause, OSError) and str(cause) else ""
        raise ConnectionFailed(f"could not reach PostgreSQL at {redact(dsn)}{detail}") from cause


async def connect(dsn: str, *, connect_timeout: float = 10) -> asyncpg.Connection:
    """One connection; errors translated."""
    try:
        with _connecting(dsn):
            return await asyncpg.connect(
                dsn, timeout=connect_timeout, server_settings={"application_name": APPLICATION_NAME}
            )
    except (ValueError, TypeError) as exc:  # the DSN itself could not be read
        raise ConfigError(f"invalid DSN {redact(dsn)!r}: {exc}") from None


class JsonText:
    """A value already encoded as JSON text: the json/jsonb codec sends the text as it is, so a value that was
    encoded once (to measure it, say) is not encoded again."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _dumps(value: Any) -> str:
    if type(value) is JsonText:
        return value.text
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:  # as a ValueError: the driver makes it a DataError, like any value not sendable
        raise ValueError("the value is nested too deeply to be sent as JSON") from None


class UnreadableJSON:
    """Stands in for a JSON value from the database that Python cannot read: nested deeper than its recursion
    limit, or an integer with more digits than ``int()`` converts. PostgreSQL accepts both, and any caller role
    can write them with ``caller_call``; decoding must not raise, or the one value would make the whole batch of
    messages it was claimed with unreadable. Whoever receives it refuses it with ``reason``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnreadableJSON({self.reason!r})"


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        return UnreadableJSON("it is nested too deeply")
    except ValueError:  # PostgreSQL only sends valid JSON: this is int()'s limit on digits
        return UnreadableJSON("it holds a number with too many digits")


async def init_connection(conn: asyncpg.Connection) -> None:
    """Codecs for every pooled connection: json and jsonb travel as Python values."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=_loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is. asyncpg's default reset sends ``SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`` on every release: one more round trip per call, for session state that
    pooled connections here never make (they only call the API functions; LISTEN has its own connections).
    An open transaction is still rolled back by asyncpg before this runs."""


IDLE_CONNECTION_LIFETIME = 60.0
"""Seconds a pooled connection above the pool's minimum stays open unused: an idle process goes back to its
minimum (asyncpg's default, 300 s, kept a burst's connections for five minutes)."""


class Room:
    """How many statements one pool runs at once: its size, until PostgreSQL refuses it another connection (the
    role's ``CONNECTION LIMIT`` or the server's ``max_connections`` is reached, by this process and the role's
    others); then as many as it has open, so that statements wait for one of those instead of failing. Measured
    with 16 worker processes of one role (limit 32) on one stream: the refused connections, each retried after
    0.1 s, made a call in ten wait 110 ms. After ``IDLE_CONNECTION_LIFETIME`` the pool may grow again."""

    def __init__(self, pool: asyncpg.Pool, size: int) -> None:
        self.pool = pool
        self._size = size
        self._limiter = anyio.CapacityLimiter(size)
        self._shrunk_at: float | None = None

    async def run(self, statement: Callable[[], Awaitable[T]]) -> T:
        """``statement()`` when there is room; again, once, if PostgreSQL refused the pool a new connection for
        it (nothing ran)."""
        if self._shrunk_at is not None and anyio.current_time() - self._shrunk_at > IDLE_CONNECTION_LIFETIME:
            self._shrunk_at = None
            self._limiter.total_tokens = self._size
        for attempt in (1, 2):
            async with self._limiter:
                try:
                    return await statement()
                except asyncpg.TooManyConnectionsError:
                    if attempt == 2:
                        raise
                    self._shrink()
        raise AssertionError("unreachable")

    def _shrink(self) -> None:
        room = max(self.pool.get_size(), 1)  # the connections it has open
        if room < self._limiter.total_tokens:
            log.warning("PostgreSQL refused this process another connection (the role's connection limit or the "
                        "server's max_connections is reached): its statements share the %d it has", room)
            self._limiter.total_tokens = room
        self._shrunk_at = anyio.current_time()


_rooms: dict[int, Room] = {}  # by id(pool); a pool takes no weak reference


def room_of(pool: asyncpg.Pool) -> Room:
    """The ``Room`` of a pool: one per pool, shared by every API object on it."""
    room = _rooms.get(id(pool))
    if room is None or room.pool is not pool:
        for key in [k for k, r in _rooms.items() if r.pool.is_closing()]:
            del _rooms[key]
        room = _rooms[id(pool)] = Room(pool, pool.get_max_size())
    return room


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, pooler: Pooler | None = None) -> asyncpg.Pool:
    """A pool for ``dsn``; ``pooler="transaction"`` when ``dsn`` goes through a transaction pooler."""
    try:
        with _connecting(dsn):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                max_inactive_connection_lifetime=IDLE_CONNECTION_LIFETIME,
                timeout=10,
                init=init_connection,
                reset=_keep_session,
                server_settings={"application_name": APPLICATION_NAME},
                # A transaction pooler runs each transaction on whichever server connection is free, where a
                # statement asyncpg prepared under a name on another one does not exist (PgBouncer keeps none
                # before 1.21). With no cache asyncpg's statements are unnamed and parsed again in the same
                # message sequence that binds and executes them, so each stands alone; it costs one more round
                # trip per statement (Parse and Describe first).
                statement_cache_size=0 if pooler == "transaction" else 100,
            )
    except (ValueError, TypeError) as exc:  # the DSN itself could not be read
        raise ConfigError(f"invalid DSN {redact(dsn)!r}: {exc}") from None
    assert pool is not None
    return pool


@dataclass
class _Shared:
    pool: asyncpg.Pool
    users: int = 0


@dataclass
class PoolRegistry:
    """Pools shared by the components of one process that name the same task queue and DSN.

    ``acquire(task_queue, dsn)`` returns the same pool for the same pair; the pool closes when its last user
    releases it. Components that name no task queue share the process's pool for their DSN (task queue ``None``):
    one pool per process and DSN, however many topics it serves. Naming a task queue asks for a pool of its own,
    shared only with the components that name the same. The first user's ``max_size`` sizes the pool; its
    ``pooler`` says whether the DSN goes through a transaction pooler, which all users of a DSN agree on.
    """

    _pools: dict[tuple[str | None, str], _Shared] = field(default_factory=dict)
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def acquire(self, task_queue: str | None, dsn: str, *, max_size: int = 10,
                      pooler: Pooler | None = None) -> asyncpg.Pool:
        async with self._lock:
            shared = self._pools.get((task_queue, dsn))
            if shared is None:
                pool = await create_pool(dsn, max_size=max_size, pooler=pooler)
                shared = self._pools[(task_queue, dsn)] = _Shared(pool)
            shared.users += 1
            return shared.pool

    async def release(self, pool: asyncpg.Pool) -> None:
        async with self._lock:
            for key, shared in list(self._pools.items()):
                if shared.pool is pool:
                    shared.users -= 1
                    if shared.users > 0:
                        return
                    del self._pools[key]
                    break
        await close_pool(pool)

    def __len__(self) -> int:
        return len(self._pools)


POOL_CLOSE_TIMEOUT = 5.0
"""Seconds a closing pool waits for its connections in use before it drops them: a statement a transaction pooler
holds in its queue (PgBouncer's ``query_wait_timeout``, 120 s, for a role that may no longer log in) would hold a
stopping worker that long."""


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully, or after ``POOL_CLOSE_TIMEOUT`` seconds drop what is still in use."""
    with contextlib.suppress(Exception):
        with anyio.move_on_after(POOL_CLOSE_TIMEOUT):
            await pool.close()
            return
        pool.terminate()


pools = PoolRegistry()
"""The process-wide registry behind ``task_queue`` pooling."""
