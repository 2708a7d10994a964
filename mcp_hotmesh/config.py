"""Settings: connection options, credentials, schema and stream names.

A connection is either a DSN (the short form, ``postgresql://user:pass@host:5432/db``) or a
``ConnectionOptions`` (the full form). ``WorkerCredentials`` replace the user and password of a connection,
whichever form it has, including a ``user=``/``password=`` given in the DSN's query string: the secured mode of
the seed, where a worker holds nothing but a scoped role's login.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from .errors import ConfigError

SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
STREAM_PATTERN = re.compile(r"^[A-Za-z0-9._:/-]{1,200}$")
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_SCHEMA = "hotmesh"


def check_schema(schema: str) -> str:
    """A schema name: lowercase, 1 to 40 characters, so the role names derived from it fit in 63 bytes."""
    if not isinstance(schema, str) or not SCHEMA_PATTERN.match(schema):
        raise ConfigError(
            "schema name must match ^[a-z_][a-z0-9_]{0,39}$ (lowercase letters, digits, underscores; "
            "at most 40 characters)"
        )
    return schema


def check_stream(stream: str) -> str:
    """A stream name: 1 to 200 characters from A-Z a-z 0-9 . _ : / -"""
    if not isinstance(stream, str) or not STREAM_PATTERN.match(stream):
        shown = stream[:60] + "..." if isinstance(stream, str) and len(stream) > 60 else stream
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
