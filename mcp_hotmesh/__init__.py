"""mcp-hotmesh: an MCP tool server whose tools are served by secured workers on PostgreSQL streams.

Everything a user imports is here, at the package root (the names in ``__all__`` are the contract; modules whose
names start with ``_`` are internal and may change). The code map, and the path of one tool call:

    agent ──MCP──▶ _stdio / _http        the transports (stdio for desktop hosts; Streamable HTTP, bearer auth)
                   _mcp_server           the MCP server: tools/list and tools/call on the SDK's low-level Server
                   _keepalive, _tasks,   long calls: keep-alive progress, MCP Tasks served from the calls' rows,
                   _resume               resumable Streamable HTTP streams
                   _caller               the caller side: the tool catalog, argument checks, calls and answers
                   _streams              one Python method per SQL function (sql/ is the contract)
                   _postgres             pools, LISTEN, the one place database errors are translated
    PostgreSQL ── caller_call ▶ messages ▶ NOTIFY ▶ worker_dequeue ──────────────────────────────────────┐
                   _worker, _consumer    the worker side: a Worker runs one Consumer per topic, which     │
                                         claims, runs the handler and answers (worker_respond)  ◀─────────┘
                   _pulse                a worker process's one heartbeat and one fallback poll, all topics
                   _tools                tools as typed Python functions (ToolSet, ToolContext)
                   _content              rich results (Text, Image, Audio, Resource, ResourceLink, ToolResult)
                   _questions            a handler's questions to the client (ctx.elicit, ctx.sample), worker side
                   _question_line, _asking   ... and gateway side: read, check, ask the client, answer
                   _schemas              registered tool definitions as untrusted data: bounds, no retrieval

    startup and operations:
                   _serve                ``mcp-hotmesh serve``: embedded server, migrations, roles, worker, transport
                   _cli                  the ``mcp-hotmesh`` command; _format: what it prints
                   _migrate, _roles      the admin's part: the schema, scoped roles
                   _admin                status, the dead-letter queue, settings (admin queries)
                   _approvals            tool definitions an admin approves, tool names a stream owns
                   _housekeeping         retention and the watchdog, run by every gateway and worker
                   _identity, _identity_gateway, _role_engines, _audit, _quotas
                                         HTTP identities (issued tokens, OAuth JWTs), each served as its own
                                         caller role; their audit trail and quotas
                   _embedded             the private PostgreSQL used when no DSN is given
                   _config, _logs, _metrics, _batching
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from ._config import ConnectionOptions, RetryPolicy, WorkerConfig, WorkerCredentials
from ._migrate import migrate
from ._postgres import connect
from ._questions import Elicited, Sampled
from ._roles import (
    ProvisionedRole,
    RoleInfo,
    RoleLimits,
    list_roles,
    provision_caller_role,
    provision_role,
    provision_worker_role,
    revoke,
    rotate,
    set_limits,
)
from ._tools import Tool, ToolContext, ToolSet, load_toolset
from ._worker import Worker, run_worker
from .errors import (
    Busy,
    CannotAsk,
    ConfigError,
    Conflict,
    ConnectionFailed,
    DatabaseError,
    EmbeddedServerError,
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
    ToolError,
    ToolInputError,
    ToolOutputError,
    TransportError,
    UnknownTool,
)

if TYPE_CHECKING:
    from ._content import Audio, Image, Resource, ResourceLink, Text, ToolResult

_LAZY = {"Audio", "Image", "Resource", "ResourceLink", "Text", "ToolResult"}
"""The content helpers (``_content``): loaded on first use, as they load the SDK's types (over a second)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("._content", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:
    __version__ = importlib.metadata.version("mcp-hotmesh")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare checkout, not installed
    __version__ = "0+unknown"

__all__ = [
    "Audio",
    "Busy",
    "CannotAsk",
    "ConfigError",
    "Conflict",
    "ConnectionFailed",
    "ConnectionOptions",
    "DatabaseError",
    "Elicited",
    "EmbeddedServerError",
    "HotMeshError",
    "Image",
    "InvalidInput",
    "LeaseLost",
    "LoginRefused",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProvisionedRole",
    "QuotaExceeded",
    "Resource",
    "ResourceLink",
    "RetryPolicy",
    "RoleInfo",
    "RoleLimits",
    "Sampled",
    "SchemaOutdated",
    "ServerTooOld",
    "Text",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolInputError",
    "ToolOutputError",
    "ToolResult",
    "ToolSet",
    "TransportError",
    "UnknownTool",
    "Worker",
    "WorkerConfig",
    "WorkerCredentials",
    "__version__",
    "connect",
    "list_roles",
    "load_toolset",
    "migrate",
    "provision_caller_role",
    "provision_role",
    "provision_worker_role",
    "revoke",
    "rotate",
    "run_worker",
    "set_limits",
]
