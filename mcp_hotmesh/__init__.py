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
                   _tools                tools as typed Python functions (ToolSet, ToolContext)
                   _schemas              registered tool definitions as untrusted data: bounds, no retrieval

    startup and operations:
                   _serve                ``mcp-hotmesh serve``: embedded server, migrations, roles, worker, transport
                   _cli                  the ``mcp-hotmesh`` command; _format: what it prints
                   _migrate, _roles      the admin's part: the schema, scoped roles
                   _admin                status, the dead-letter queue, settings (admin queries)
                   _housekeeping         retention and the watchdog, run by every gateway and worker
                   _embedded             the private PostgreSQL used when no DSN is given
                   _config, _logs, _metrics, _batching
"""

from __future__ import annotations

import importlib.metadata

from ._config import ConnectionOptions, RetryPolicy, WorkerConfig, WorkerCredentials
from ._migrate import migrate
from ._postgres import connect
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
    ServerTooOld,
    ToolError,
    ToolInputError,
    ToolOutputError,
    TransportError,
    UnknownTool,
)

try:
    __version__ = importlib.metadata.version("mcp-hotmesh")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare checkout, not installed
    __version__ = "0+unknown"

__all__ = [
    "Busy",
    "ConfigError",
    "Conflict",
    "ConnectionFailed",
    "ConnectionOptions",
    "DatabaseError",
    "EmbeddedServerError",
    "HotMeshError",
    "InvalidInput",
    "LeaseLost",
    "LoginRefused",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProvisionedRole",
    "QuotaExceeded",
    "RetryPolicy",
    "RoleInfo",
    "RoleLimits",
    "ServerTooOld",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolInputError",
    "ToolOutputError",
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
