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

import contextlib
import functools
import importlib.metadata
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import anyio
from mcp import MCPError
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import CallNext, HandlerResult
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
    ServerCapabilities,
    ServerTasksCapability,
    ServerTasksRequestsCapability,
    TasksCallCapability,
    TasksCancelCapability,
    TasksToolsCapability,
    TextContent,
    Tool,
    ToolAnnotations,
    ToolExecution,
)
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

from ._asking import asker_for
from ._caller import Engine, Outcome
from ._common import clip
from ._content import call_result
from ._keepalive import DEFAULT_INTERVAL, Progress, keep_alive
from ._metrics import UNKNOWN, GatewayMetrics, classify
from ._resume import stream_state
from ._streams import QueueStats, ToolRecord
from ._tasks import EXTENSION as TASKS_EXTENSION
from ._tasks import Tasks
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

    def get_capabilities(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
        *,
        protocol_version: str | None = None,
    ) -> ServerCapabilities:
        capabilities = super().get_capabilities(notification_options, experimental_capabilities, extensions,
                                                protocol_version=protocol_version)
        if protocol_version not in MODERN_PROTOCOL_VERSIONS and TASKS_EXTENSION in self.extensions:
            # 2025-11-25 clients: task-augmented tools/call, tasks/get, tasks/result and tasks/cancel (no list)
            capabilities.tasks = ServerTasksCapability(
                cancel=TasksCancelCapability(),
                requests=ServerTasksRequestsCapability(tools=TasksToolsCapability(call=TasksCallCapability())))
        return capabilities


IDEMPOTENCY_KEY = "io.github.mcp-hotmesh/idempotency-key"
"""The key in a ``tools/call`` request's ``_meta`` whose value (a string of 1 to 200 characters) makes a repeated
call, by the same caller role, return the first call's answer instead of running again."""


def listed(r: ToolRecord) -> Tool:
    """A tool as ``tools/list`` sends it. Its metadata was checked at registration; a row that got in anyway
    without passing the SDK's types is listed without it (one log line), never failing the list."""
    tool = Tool(name=r.name, description=r.description, input_schema=r.input_schema, output_schema=r.output_schema,
                execution=ToolExecution(task_support="optional"))  # any call may run as a task (_tasks)
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


def _wants_progress(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether the client sent a progress token with this request (in-process clients: a progress callback)."""
    if ctx.meta is not None and ctx.meta.get("progress_token") is not None:
        return True
    outbound = getattr(ctx.session, "_request_outbound", None)
    return getattr(outbound, "_on_progress", None) is not None


def request_token(ctx: ServerRequestContext[Any, Any]) -> AccessToken | None:
    """The verified bearer token of a request over HTTP (None over stdio), read from the request itself: a
    session's task may have been started by an earlier request."""
    request = getattr(ctx, "request", None)
    scope = getattr(request, "scope", None)
    user = scope.get("user") if isinstance(scope, dict) else None
    return user.access_token if isinstance(user, AuthenticatedUser) else get_access_token()


def error_result(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=message)], is_error=True)


class McpGateway:
    """The MCP face of an ``Engine``; ``server`` is what transports (and ``mcp.Client(server)``) run."""

    def __init__(self, engine: Engine, *, name: str = "mcp-hotmesh", keepalive: float = DEFAULT_INTERVAL) -> None:
        self.engine = engine
        self.keepalive = keepalive  # seconds a call may be quiet before a client that asked for progress hears
        self.metrics = GatewayMetrics()
        self.bus = InMemorySubscriptionBus()
        self._legacy: dict[int, ServerSession] = {}
        # tools/list as sent, per engine (a gateway serving identities has one per caller role) and protocol
        # version: (the engine's catalog_version it was made from, the wire result)
        self._listed: weakref.WeakKeyDictionary[Engine, dict[str, tuple[object, dict[str, Any]]]] = (
            weakref.WeakKeyDictionary())
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
        Tasks(lambda ctx: self.engine_for(request_token(ctx)), self.result_of).install(self.server)
        self.server.middleware.append(self._cached_listing)

    @contextlib.asynccontextmanager
    async def engine_for(self, who: AccessToken | None) -> AsyncIterator[Engine]:
        """The engine a request bearing ``who`` (its verified token; None over stdio) acts through outside this
        gateway's own handlers (tasks, a resumed stream): here the gateway's one caller role. A gateway serving
        identities (``_identity_gateway``) answers with the identity's own role."""
        yield self.engine

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
    async def _cached_listing(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """``tools/list`` from its wire form, kept until the catalog changes. The SDK checks a handler's result
        against the protocol version's schema and dumps it again on every request, but sends a middleware's as it
        is: at 1,000 tools over Streamable HTTP, 19.2 ms p50 a listing before and 6.2 ms after (``python -m
        benchmarks.sweep``, a quiet machine)."""
        if ctx.method != "tools/list" or (isinstance(ctx.params, dict) and ctx.params.get("cursor")):
            return await call_next(ctx)
        engine = self.listing_engine(ctx)
        if engine is None:
            return await call_next(ctx)
        self._remember(ctx)
        version = engine.catalog_version  # read first: a listing made while the catalog changes is made again
        kept = self._listed.setdefault(engine, {})
        cached = kept.get(ctx.protocol_version)
        if cached is not None and cached[0] is version:
            return cached[1]
        wire = await call_next(ctx)
        if isinstance(wire, dict):
            kept[ctx.protocol_version] = (version, wire)
        return wire

    def listing_engine(self, ctx: ServerRequestContext[Any, Any]) -> Engine | None:
        """The engine whose catalog a ``tools/list`` request lists, if it is known before the handler runs."""
        return self.engine

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        """The tools whose registered definitions passed the engine's checks (a verdict cached per definition when
        the catalog was refreshed: nothing is checked here)."""
        self._remember(ctx)
        return ListToolsResult(tools=[listed(r) for r in self.engine.listable()])

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> CallToolResult:
        self._remember(ctx)

        started = time.monotonic()
        label = "error"
        outcome: Outcome | None = None
        try:
            outcome = await self._called(ctx, params)
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
        return self.result_of(outcome)

    @staticmethod
    def result_of(outcome: Outcome) -> CallToolResult:
        """What the client is told of a call's outcome."""
        if outcome.error is not None or outcome.result is None:
            return error_result(outcome.error or "the tool returned nothing")
        return call_result(outcome.result)  # plain or rich, checked as the worker role's hostile input

    def after_call(self, params: CallToolRequestParams, tool: str, label: str, seconds: float,
                   outcome: Outcome | None) -> None:
        """A call ended (``tool``: its catalog name or ``(unknown)``; ``label``: its outcome kind). The gateway that
        serves identities (``_identity_gateway``) writes its audit record here."""

    async def _called(self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> Outcome:
        """``Engine.call``; once the call is queued, an HTTP stream learns its id (so a client may reconnect to it,
        ``_resume``), and a client that asked for progress hears keep-alives while the call is quiet."""
        progress = Progress(ctx.session.report_progress)
        resumable = stream_state(ctx.request)
        if resumable is not None:
            resumable.begin(ctx.protocol_version)

        def announce(call_id: UUID) -> None:
            if resumable is not None:
                resumable.enqueued(call_id, ctx.request_id)

        raw = (params.meta or {}).get(IDEMPOTENCY_KEY)
        key = raw if raw is None or isinstance(raw, str) else ""  # "": refused by the engine, with why
        call = functools.partial(self.engine.call, params.name, params.arguments, report=progress.handler,
                                 idempotency_key=key, asker=asker_for(ctx))
        if not _wants_progress(ctx):
            return await call(on_enqueued=announce if resumable is not None else None)
        outcome: Outcome | None = None
        unknown: UnknownTool | None = None
        async with anyio.create_task_group() as keepalives:

            def follow(call_id: UUID) -> None:
                announce(call_id)
                keepalives.start_soon(keep_alive, progress, lambda: self.engine.api.status(call_id), self.keepalive)

            try:
                outcome = await call(on_enqueued=follow)
            except UnknownTool as exc:  # raised as itself, not in an exception group
                unknown = exc
            keepalives.cancel_scope.cancel()
        if unknown is not None:
            raise unknown
        assert outcome is not None
        return outcome

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
