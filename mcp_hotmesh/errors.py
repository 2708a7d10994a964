"""The exceptions mcp-hotmesh raises.

Every error the package raises is a ``HotMeshError``; no driver exception crosses the public API.
Database errors are translated in one place, ``mcp_hotmesh._postgres.translate``.

    HotMeshError
    ├── ConfigError            a setting, name or argument is invalid (raised before any I/O)
    ├── Conflict               the request conflicts with what exists or runs (a role exists, a worker runs)
    ├── TransportError         an MCP transport could not start (the HTTP port is taken)
    ├── UnknownTool            no tool by that name is available to this gateway
    ├── ToolError              a tool refused the call: the agent sees the message; not retried, not dead-lettered
    │   ├── ToolInputError     the arguments do not match the tool's input schema
    │   ├── ToolOutputError    the tool returned something that is not JSON or not of its output schema
    │   └── CannotAsk          the calling client cannot answer a handler's question (no elicitation, sampling)
    ├── DatabaseError          the database refused or failed in a way not listed below
    │   ├── ConnectionFailed   the server cannot be reached
    │   │   └── LoginRefused   it refused the login: wrong password, or a revoked role
    │   ├── PermissionDenied   the role may not use this stream or function (SQLSTATE 42501)
    │   ├── LeaseLost          the message's lease was lost: another worker may own it now
    │   ├── PayloadTooLarge    arguments, result or schema exceed the configured limit
    │   ├── InvalidInput       a name, argument or tool registration was refused
    │   ├── NotFound           no such call, role or message (for this role)
    │   ├── QuotaExceeded      the role's queue quota on a stream is used up (SQLSTATE HM006)
    │   ├── Busy               a lock wait timed out: a row is held by another session; try again
    │   ├── SchemaOutdated     the schema lacks a function this version calls: not migrated yet (SQLSTATE 42883)
    │   └── ServerTooOld       PostgreSQL older than 15
    └── EmbeddedServerError    the embedded PostgreSQL could not be started or stopped

The message of each error is safe to show to an agent: it never carries SQL, a DSN, a password or a
traceback. The docstring of each class is its default message.
"""

from __future__ import annotations


class HotMeshError(Exception):
    """mcp-hotmesh failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(HotMeshError):
    """The configuration is invalid."""


class Conflict(HotMeshError):
    """The request conflicts with what exists or is running."""


class TransportError(HotMeshError):
    """The MCP transport could not start."""


class UnknownTool(HotMeshError):
    """No tool by that name is available to this gateway."""


class ToolError(HotMeshError):
    """The tool refused the call.

    Raise it in a handler for a call that cannot succeed as it was made (an unknown SKU, a refused request): the
    agent gets the message as the tool's error result at once; the call is not retried and does not go to the
    dead-letter queue. Any other exception is retried by the tool's ``RetryPolicy`` and dead-lettered when the
    attempts are used up."""


class ToolInputError(ToolError):
    """The arguments do not match the tool's input schema."""


class ToolOutputError(ToolError):
    """The tool returned something that is not JSON or does not match its output schema."""


class CannotAsk(ToolError):
    """The calling client cannot answer this question: it does not support elicitation (or sampling), or it
    failed to answer. Uncaught in a handler, the agent is told so as the tool's error result."""


class DatabaseError(HotMeshError):
    """The database could not complete the request."""


class ConnectionFailed(DatabaseError):
    """Could not connect to PostgreSQL."""


class LoginRefused(ConnectionFailed):
    """PostgreSQL refused the login: a wrong user or password, or a role that may not log in (revoked)."""


class PermissionDenied(DatabaseError):
    """This role is not allowed to do that."""


class LeaseLost(DatabaseError):
    """The message's lease was lost; another worker may be handling it."""


class PayloadTooLarge(DatabaseError):
    """The payload is larger than the configured limit."""


class InvalidInput(DatabaseError):
    """The database refused the value."""


class NotFound(DatabaseError):
    """Not found."""


class QuotaExceeded(DatabaseError):
    """Too many messages are waiting on this stream for this role."""


class Busy(DatabaseError):
    """The database is busy with this row (another session holds it); try again shortly."""


class SchemaOutdated(DatabaseError):
    """The database schema is older than this mcp-hotmesh: run mcp-hotmesh migrate."""


class ServerTooOld(DatabaseError):
    """mcp-hotmesh needs PostgreSQL 15 or newer."""


class EmbeddedServerError(HotMeshError):
    """The embedded PostgreSQL server could not be started."""
