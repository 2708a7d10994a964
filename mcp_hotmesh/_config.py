"""Settings: connection options, credentials, schema and stream names.

A connection is either a DSN (the short form, ``postgresql://user:pass@host:5432/db``) or a
``ConnectionOptions`` (the full form). ``WorkerCredentials`` replace the user and password of a connection,
whichever form it has, including a ``user=``/``password=`` given in the DSN's query string: the secured mode of
the seed, where a worker holds nothing but a scoped role's login.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ._common import clip
from .errors import ConfigError

# The one definition of each name rule (the SQL functions enforce the same). Always used with fullmatch.
SCHEMA_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,39}")
STREAM_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,200}")  # no comma: an allow-list is comma-separated
TOOL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what Claude accepts
DEFAULT_SCHEMA = "hotmesh"


def check_schema(schema: str) -> str:
    """A schema name: lowercase, 1 to 40 characters, so the role names derived from it fit in 63 bytes."""
    if not isinstance(schema, str) or not SCHEMA_PATTERN.fullmatch(schema):
        raise ConfigError(
            "schema name must match ^[a-z_][a-z0-9_]{0,39}$ (lowercase letters, digits, underscores; "
            "at most 40 characters)"
        )
    return schema


def check_stream(stream: str) -> str:
    """A stream name: 1 to 200 characters from A-Z a-z 0-9 . _ : / -"""
    if not isinstance(stream, str) or not STREAM_PATTERN.fullmatch(stream):
        shown = clip(stream, 63) if isinstance(stream, str) else stream
        raise ConfigError(
            f"invalid stream name {shown!r}: use 1 to 200 characters from A-Z a-z 0-9 . _ : / -"
        )
    return stream


class ConnectionOptions(BaseModel):
    """The full form of a connection. Any field left out falls back to libpq's usual defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    password: SecretStr | None = None
    database: str | None = None
    sslmode: str | None = None

    def to_dsn(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = quote(self.user, safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password.get_secret_value(), safe="")
            userinfo += "@"
        query: dict[str, str] = {}
        host = self.host or ""
        if host.startswith("/"):  # a Unix socket directory
            query["host"] = host
            host = ""
        netloc = userinfo + host + (f":{self.port}" if self.port and host else "")
        if self.port and not host:
            query["port"] = str(self.port)
        if self.sslmode:
            query["sslmode"] = self.sslmode
        return urlunsplit(("postgresql", netloc, "/" + quote(self.database or "", safe=""), urlencode(query), ""))


class WorkerCredentials(BaseModel):
    """A scoped role's login. Replaces the user and password of the connection it is given with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user: Annotated[str, Field(min_length=1, max_length=63)]
    password: SecretStr


Connection = str | ConnectionOptions


def connection_dsn(connection: Connection, credentials: WorkerCredentials | None = None) -> str:
    """The DSN to connect with; ``credentials``, when given, replace the connection's user and password."""
    dsn = connection.to_dsn() if isinstance(connection, ConnectionOptions) else connection
    if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError("a connection must be a postgresql:// DSN or ConnectionOptions")
    if credentials is None:
        return dsn
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2]
    userinfo = quote(credentials.user, safe="") + ":" + quote(credentials.password.get_secret_value(), safe="")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("user", "password")]
    return urlunsplit((parts.scheme, f"{userinfo}@{hosts}", parts.path, urlencode(query), parts.fragment))


Pooler = Literal["transaction"]
"""A pooler between a component and PostgreSQL that it must know of: ``"transaction"``, one in transaction mode
(PgBouncer's ``pool_mode = transaction``), which lends each transaction whichever server connection is free."""


def check_pooler(pooler: object, listen: object) -> Pooler | None:
    """``pooler`` (``None`` or ``"transaction"``), checked against ``listen``, the LISTEN connection's DSN if one
    is given: a transaction pooler cannot carry LISTEN (the server session that ran it goes back to the pooler's
    pool when the statement ends, so what it hears is not the listener's), so it needs one."""
    if pooler is None:
        return None
    if pooler != "transaction":
        raise ConfigError(f"unknown pooler {pooler!r}: the one a worker or gateway must be told of is 'transaction'")
    if listen is None:
        raise ConfigError("behind a transaction pooler LISTEN needs a session of its own: give listen_dsn "
                          "(--listen-dsn), PostgreSQL's own address or a session-mode pool's")
    return "transaction"


def dsn_user(dsn: str) -> str | None:
    """The user a DSN logs in as, if it names one."""
    parts = urlsplit(dsn)
    for key, value in parse_qsl(parts.query):
        if key == "user":
            return value
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at:
        return None
    return unquote(userinfo.partition(":")[0]) or None


def redact(dsn: str) -> str:
    """A DSN without its password, for logs."""
    parts = urlsplit(dsn)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, f"{userinfo}{at}{hosts}", parts.path, urlencode(query), parts.fragment))


def as_dict(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


# -------------------------------------------------------------------------------------- worker configuration
# The seed's worker options (HotMesh's WorkerConfig), in Python names. All times are milliseconds, as in the seed.

Callback = Callable[..., Awaitable[Any]]
"""``async callback(args, ctx) -> result``: the arguments as JSON, a ``ToolContext``, the result as JSON."""


class RetryPolicy(BaseModel):
    """How a handler that raised is retried: exponential backoff, in milliseconds.

    After the attempt numbered ``n`` (0 for the first) raised, the next one runs
    ``min(initial_interval * backoff_coefficient ** n, maximum_interval)`` ms later, until ``maximum_attempts``
    attempts have run; then the message is dead-lettered and the caller gets the exception's message.
    No retry is ever scheduled past the call's deadline (the database dead-letters it instead).

    Defaults: ``maximum_attempts=3``, ``initial_interval=500``, ``backoff_coefficient=2``,
    ``maximum_interval=5000``. An agent waits for the answer, so a transient failure (a flaky API, a dropped
    connection) gets two quick second chances, 0.5 s then 1 s later, and a real bug reaches the agent in about
    two seconds instead of HotMesh's minutes (coefficient 10, up to 120 s between attempts).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    maximum_attempts: int = Field(default=3, ge=1, le=1000)
    initial_interval: int = Field(default=500, ge=0, le=86_400_000)
    backoff_coefficient: float = Field(default=2.0, ge=1.0, le=100.0)
    maximum_interval: int = Field(default=5_000, ge=0, le=86_400_000)

    @model_validator(mode="after")
    def _interval_order(self) -> RetryPolicy:
        if self.maximum_interval < self.initial_interval:
            raise ValueError("maximum_interval must not be smaller than initial_interval")
        return self

    def next_delay(self, attempt: int) -> int | None:
        """Milliseconds before retrying after attempt ``attempt`` (0-based) failed; None when none is left."""
        if attempt + 1 >= self.maximum_attempts:
            return None
        try:
            delay = self.initial_interval * self.backoff_coefficient ** max(attempt, 0)
        except OverflowError:
            return self.maximum_interval
        return int(min(delay, self.maximum_interval))


class WorkerConfig(BaseModel):
    """One worker: a callback serving one topic (and workflow name), and how it consumes.

    =====================  =====================================================================================
    ``topic``              the stream the worker consumes (required)
    ``callback``           ``async (args, ctx) -> result`` (required unless ``readonly``)
    ``connection``         a DSN (the short form) or ``ConnectionOptions`` (required)
    ``readonly``           ``False``. True: never claims a message (and does not count as a live worker),
                           but can still publish and register tools
    ``reclaim_delay``      ``10000`` ms: how long a lease lasts before another worker may reclaim the message.
                           A running handler's lease is extended every ``reclaim_delay / 2``, so only a worker
                           that died or lost the database loses its messages, and another worker takes them
                           over within about 10 s: well inside the minute an agent waits for a tool (HotMesh's
                           60 s would eat all of it)
    ``reclaim_count``      ``3``: reclaims before the message is dead-lettered with an error answer for the
                           caller. A message that kills its worker three times is poison; it should not take
                           down every worker in turn
    ``retry``              ``RetryPolicy()``: 3 attempts, 500 ms, x2, at most 5 s (see ``RetryPolicy``)
    ``retry_on``           ``None``: every exception but ``ToolError`` is retried by ``retry``. A tuple of
                           exception classes: only those are; any other is dead-lettered at once
    ``task_queue``         ``None``. Components of one process that name the same task queue and connect
                           with the same DSN share one connection pool; with none, each topic has its own
    ``worker_credentials`` ``None``. A scoped role's ``user`` and ``password``, replacing those in
                           ``connection``: the secured mode
    ``workflow_name``      ``""``. Workers on one topic with different workflow names are served by one
                           consumer per topic, which fetches batches for all of them and dispatches each
                           message by its workflow name; a message no local callback serves stays queued for
                           a worker that can serve it
    =====================  =====================================================================================

    Workers that share a consumer (same topic and connection) must agree on ``reclaim_delay``,
    ``reclaim_count`` and ``task_queue``: they describe the consumer, not one callback.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str = Field(pattern=STREAM_PATTERN.pattern)
    callback: Callback | None = None
    connection: Connection
    readonly: bool = False
    reclaim_delay: int = Field(default=10_000, ge=1, le=3_600_000)
    reclaim_count: int = Field(default=3, ge=0, le=1000)
    retry: RetryPolicy = RetryPolicy()
    retry_on: tuple[type[BaseException], ...] | None = None
    task_queue: str | None = Field(default=None, min_length=1, max_length=200)
    worker_credentials: WorkerCredentials | None = None
    workflow_name: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _check(self) -> WorkerConfig:
        if self.callback is None and not self.readonly:
            raise ValueError("a worker that is not readonly needs a callback")
        try:
            connection_dsn(self.connection, self.worker_credentials)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def dsn(self) -> str:
        """The DSN this worker connects with: ``worker_credentials``, when given, replace the login."""
        return connection_dsn(self.connection, self.worker_credentials)
