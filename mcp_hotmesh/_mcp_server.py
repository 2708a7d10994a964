"""The MCP server: each registered tool on the caller role's streams, as the SDK's low-level ``Server``.

The database side (the catalog, argument checks, calls and their answers) is the caller engine
(``_caller.Engine``); the transports that carry this server are ``_stdio`` and ``_http``; starting it all is
``_serve``. The tool list is data, so this is the SDK's low-level ``Server``:

* ``tools/list`` is ``caller_tools()``, cached by the engine and refreshed on the registry's NOTIFY;
* when the registry changes, clients hear ``notifications/tools/list_changed`` in both protocol eras: clients
  of 2026-07-28 on their ``subscriptions/listen`` stream (``InMemorySubscriptionBus``), handshake-era clients on
  the session captured from their earlier requests;
* ``tools/call`` is ``Engine.call``: a bad call is an ``isError`` result the model can correct, an unknown tool
  is JSON-RPC error -32602, worker progress becomes MCP progress, a cancelled request cancels the call.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from typing import Any

import anyio
from mcp import MCPError
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp.types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    CallToolResult,
    Icon,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
    ToolAnnotations,
)
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

from ._asking import asker_for
from ._caller import Engine, Outcome
from ._common import clip
from ._content import call_result
from ._metrics import UNKNOWN, GatewayMetrics, classify
from ._streams import QueueStats, ToolRecord
from .errors import HotMeshError, UnknownTool

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Each tool here is served by a worker process behind a PostgreSQL queue. A tool result marked as an error "
    "says what went wrong in plain words: invalid arguments (fix them and call again), the tool's own failure, "
    "a timeout, or a tool that is offline because no worker runs it right now."
)


def _version() -> str:
    try:
        return importlib.metadata.version("mcp-hotmesh")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


class _HotMeshServer(Server[Any]):
    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        # Handshake-era clients read tools.listChanged from the initialize result; the HTTP session manager and
        # the in-memory legacy transport call this with no arguments, so the flag is defaulted here.
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True), experimental_capabilities, extensions
        )


IDEMPOTENCY_KEY = "io.github.mcp-hotmesh/idempotency-key"
"""The key in a ``tools/call`` request's ``_meta`` whose value (a string of 1 to 200 characters) makes a repeated
call, by the same caller role, return the first call's answer instead of running again."""


def listed(r: ToolRecord) -> Tool:
    """A tool as ``tools/list`` sends it. Its metadata was checked at registration; a row that got in anyway
    without passing the SDK's types is listed without it (one log line), never failing the list."""
    tool = Tool(name=r.name, description=r.description, input_schema=r.input_schema, output_schema=r.output_schema)
    if r.title is None and r.annotations is None and r.icons is None and r.meta is None:
        return tool
    try:
        return tool.model_copy(update={
            "title": r.title,
            "annotations": ToolAnnotations.model_validate(r.annotations) if r.annotations is not None else None,
            "icons": [Icon.model_validate(i) for i in r.icons] if r.icons is not None else None,
            "meta": dict(r.meta) if r.meta is not None else None,
        })
    except Exception as exc:  # hostile input must cost its own metadata, nothing more
        log.warning("tool %r is listed without its title, annotations, icons and meta: %s", clip(r.name, 80),
                    clip(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 200))
        return tool


def error_result(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=message)], is_error=True)


class McpGateway:
    """The MCP face of an ``Engine``; ``server`` is what transports (and ``mcp.Client(server)``) run."""

    def __init__(self, engine: Engine, *, name: str = "mcp-hotmesh") -> None:
        self.engine = engine
        self.metrics = GatewayMetrics()
        self.bus = InMemorySubscriptionBus()
        self._legacy: dict[int, ServerSession] = {}
        self._listed: tuple[object, dict[str, Any]] | None = None  # (engine.catalog_version, its tools/list)
        self.server = _HotMeshServer(
            name,
            version=_version(),
            instructions=INSTRUCTIONS,
            get_tool_input_schema=engine.input_schema,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_subscriptions_listen=ListenHandler(self.bus),
        )
        engine.on_tools_changed = self.notify_tools_changed

    # ------------------------------------------------------------------------------------- list_changed
    def _remember(self, ctx: ServerRequestContext[Any, Any]) -> None:
        """Keep a handshake-era client's session, to tell it later that the tool list changed."""
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return
        connection = getattr(ctx.session, "_connection", None)  # one per client connection
        key = id(connection) if connection is not None else id(ctx.session)
        if key in self._legacy:
            return
        self._legacy[key] = ctx.session
        stack = getattr(connection, "exit_stack", None)
        if stack is not None:
            stack.callback(self._legacy.pop, key, None)  # forget it when the connection closes

    async def notify_tools_changed(self) -> None:
        await self.bus.publish(ToolsListChanged())
        for session in list(self._legacy.values()):
            try:
                await session.send_tool_list_changed()  # best effort: dropped when the client is gone
            except Exception as exc:  # a dead session must not stop the others hearing it
                log.debug("list_changed not delivered: %s", exc)

    # ----------------------------------------------------------------------------------------- handlers
    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        """The tools whose registered definitions passed the engine's checks (a verdict cached per definition when
        the catalog was refreshed: nothing is checked here). Built once per catalog and kept until the catalog
        changes, as the JSON the SDK would make of it: the SDK sends a handler's dict as it is, and dumps a model on
        every request (measured at 1,000 tools over HTTP: 156 ms p50 rebuilt per request, 68 ms with the model
        cached, see ``python -m benchmarks.sweep``)."""
        self._remember(ctx)
        version = self.engine.catalog_version
        if self._listed is None or self._listed[0] is not version:
            tools = [listed(r) for r in self.engine.listable()]
            listing = ListToolsResult(tools=tools).model_dump(by_alias=True, mode="json", exclude_none=True)
            self._listed = (version, listing)
        return self._listed[1]  # type: ignore[return-value]  # the SDK's runner takes a dict as the result

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> CallToolResult:
        self._remember(ctx)

        async def report(progress: float, total: float | None, message: str | None) -> None:
            try:
                await ctx.session.report_progress(progress, total, message)
            except Exception as exc:  # progress is a courtesy; the call goes on
                log.debug("progress not delivered: %s", exc)

        started = time.monotonic()
        label = "error"
        outcome: Outcome | None = None
        try:
            raw = (params.meta or {}).get(IDEMPOTENCY_KEY)
            key = raw if raw is None or isinstance(raw, str) else ""  # "": refused by the engine, with why
            outcome = await self.engine.call(params.name, params.arguments, report=report, idempotency_key=key,
                                             asker=asker_for(ctx))
            label = classify(outcome)
        except UnknownTool as exc:
            label = "unknown_tool"
            raise MCPError(INVALID_PARAMS, exc.message) from None
        except anyio.get_cancelled_exc_class():
            label = "cancelled"
            raise
        finally:  # a name the catalog does not know never becomes a label
            tool = params.name if self.engine.input_schema(params.name) is not None else UNKNOWN
            elapsed = time.monotonic() - started
            self.metrics.observe(tool, label, elapsed)
            log.info("call %s: %s in %.0f ms", tool, label, elapsed * 1000)  # no arguments: they may be private
            self.after_call(params, tool, label, elapsed, outcome)
        if outcome.error is not None or outcome.result is None:
            return error_result(outcome.error or "the tool returned nothing")
        return call_result(outcome.result)  # plain or rich, checked as the worker role's hostile input

    def after_call(self, params: CallToolRequestParams, tool: str, label: str, seconds: float,
                   outcome: Outcome | None) -> None:
        """A call ended (``tool``: its catalog name or ``(unknown)``; ``label``: its outcome kind). The gateway that
        serves identities (``_identity_gateway``) writes its audit record here."""

    async def metrics_text(self) -> str:
        """``/metrics``: this process's counters, and the queues of the gateway role's streams."""
        queues: list[QueueStats] | None
        try:
            with anyio.fail_after(3):
                queues = await self.engine.api.stats()
        except (HotMeshError, TimeoutError) as exc:
            log.warning("metrics: queue statistics unavailable: %s", exc)
            queues = None
        return self.metrics.render(tools=self.engine.tools(), queues=queues,
                                   listen_reconnects=self.engine.listener.reconnects)
