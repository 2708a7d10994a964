"""The MCP server: each registered tool on the caller role's streams, served over stdio or Streamable HTTP.

Every import of the ``mcp`` SDK is in this file, so an SDK change touches one file. The database side (the
catalog, argument checks, calls and their answers) is ``gateway_core.Engine``; starting a gateway (embedded
server, migrations, roles, the attached worker) is ``gateway_serve``.

The tool list is data, so this is the SDK's low-level ``Server``:

* ``tools/list`` is ``caller_tools()``, cached by the engine and refreshed on the registry's NOTIFY;
* when the registry changes, clients hear ``notifications/tools/list_changed`` in both protocol eras: clients
  of 2026-07-28 on their ``subscriptions/listen`` stream (``InMemorySubscriptionBus``), handshake-era clients on
  the session captured from their earlier requests;
* ``tools/call`` is ``Engine.call``: a bad call is an ``isError`` result the model can correct, an unknown tool
  is JSON-RPC error -32602, worker progress becomes MCP progress, a cancelled request cancels the call.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.metadata
import io
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
from mcp import MCPError
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp.types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
)
from mcp.types.version import MODERN_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from .errors import ConfigError, HotMeshError
from .gateway_core import Engine, UnknownTool
from .metrics import CONTENT_TYPE, UNKNOWN, GatewayMetrics, classify
from .ops import QueueStats, queue_stats, retention_loop, watchdog_loop

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Each tool here is served by a worker process behind a PostgreSQL queue. A tool result marked as an error "
    "says what went wrong in plain words: invalid arguments (fix them and call again), the tool's own failure, "
    "a timeout, or a tool that is offline because no worker runs it right now."
)
MIN_TOKEN_LENGTH = 16


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


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2)


def error_result(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=message)], is_error=True)


class McpGateway:
    """The MCP face of an ``Engine``; ``server`` is what transports (and ``mcp.Client(server)``) run."""

    def __init__(self, engine: Engine, *, name: str = "mcp-hotmesh") -> None:
        self.engine = engine
        self.metrics = GatewayMetrics()
        self.bus = InMemorySubscriptionBus()
        self._legacy: dict[int, ServerSession] = {}
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
        the catalog was refreshed: nothing is checked here)."""
        self._remember(ctx)
        tools = [
            Tool(name=r.name, description=r.description, input_schema=r.input_schema, output_schema=r.output_schema)
            for r in self.engine.listable()
        ]
        return ListToolsResult(tools=tools)

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> CallToolResult:
        self._remember(ctx)

        async def report(progress: float, total: float | None, message: str | None) -> None:
            try:
                await ctx.session.report_progress(progress, total, message)
            except Exception as exc:  # progress is a courtesy; the call goes on
                log.debug("progress not delivered: %s", exc)

        started = time.monotonic()
        label = "error"
        try:
            outcome = await self.engine.call(params.name, params.arguments, report=report)
            label = classify(outcome)
        except UnknownTool as exc:
            label = "unknown_tool"
            raise MCPError(INVALID_PARAMS, exc.message) from None
        except anyio.get_cancelled_exc_class():
            label = "cancelled"
            raise
        finally:  # a name the catalog does not know never becomes a label
            tool = params.name if self.engine.input_schema(params.name) is not None else UNKNOWN
            self.metrics.observe(tool, label, time.monotonic() - started)
        if outcome.error is not None or outcome.result is None:
            return error_result(outcome.error or "the tool returned nothing")
        try:
            text = _text(outcome.result)
        except (TypeError, ValueError, RecursionError):  # an answer written by hand that Python cannot read back
            return error_result("The tool's answer could not be read (it is not plain JSON). Tell the user the tool "
                                "service returned a malformed answer.")
        return CallToolResult(content=[TextContent(text=text)], structured_content=outcome.result)

    async def metrics_text(self) -> str:
        """``/metrics``: this process's counters, and the queues of the gateway role's streams."""
        queues: list[QueueStats] | None
        try:
            with anyio.fail_after(3):
                queues = await queue_stats(self.engine.api.pool, self.engine.schema)
        except (HotMeshError, TimeoutError) as exc:
            log.warning("metrics: queue statistics unavailable: %s", exc)
            queues = None
        return self.metrics.render(tools=self.engine.tools(), queues=queues,
                                   listen_reconnects=self.engine.listener.reconnects)


# ---------------------------------------------------------------------------------------------- stdio
@contextlib.contextmanager
def protocol_stdout() -> Iterator[anyio.AsyncFile[str]]:
    """Keep stdout for the protocol alone, from the very start to the process's exit: the real stdout moves to a
    private descriptor only the protocol writes, fd 1 points at stderr (a child process, a C library) and so
    does ``sys.stdout`` (a ``print``), so nothing else can write a stray line into the protocol.

    Neither is pointed back at the real stdout on exit. Without PYTHONUNBUFFERED (a user's host does not set
    it) ``sys.stdout`` is block-buffered on a pipe: what sits in that buffer, and what atexit handlers print,
    is written when the interpreter flushes it at shutdown, and must land on stderr, not after the protocol's
    last message. Closing the wire, its only descriptor, is what tells the host the protocol has ended."""
    wire = os.dup(1)
    os.dup2(2, 1)
    sys.stdout.flush()  # after the move: what was printed before serving goes to stderr, not ahead of the protocol
    # not a block buffer on fd 1: a print goes to stderr at once, in order with the logs
    buffered, sys.stdout = sys.stdout, sys.stderr
    stream = io.TextIOWrapper(os.fdopen(wire, "wb"), encoding="utf-8", newline="\n")
    try:
        yield anyio.wrap_file(stream)
    finally:
        with contextlib.suppress(OSError, ValueError):
            buffered.flush()  # writes through a reference kept to the old sys.stdout: to stderr, now
        with contextlib.suppress(OSError, ValueError):
            stream.close()  # the host may be gone already (a broken pipe)


async def run_stdio(gateway: McpGateway, stdout: anyio.AsyncFile[str] | None = None) -> None:
    """Serve one client on stdin/stdout until stdin closes. Only protocol goes to stdout."""
    async with stdio_server(stdout=stdout) as (read_stream, write_stream):
        await gateway.server.run(read_stream, write_stream, gateway.server.create_initialization_options())


# ----------------------------------------------------------------------------------------------- HTTP
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_token(host: str, token: str | None) -> str:
    """The bearer token HTTP clients must send. Required on every address, loopback included."""
    if not token:
        where = "on a loopback address too: any local process or user could call the tools otherwise"
        if not is_loopback(host):
            where = f"and refuses to listen on the non-loopback address {host!r} without one"
        raise ConfigError(
            f"--transport http needs a bearer token (--token or HOTMESH_TOKEN) {where}. Make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"the bearer token must be at least {MIN_TOKEN_LENGTH} characters")
    return token


class StaticTokenVerifier(TokenVerifier):
    """Accepts exactly one bearer token, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="mcp-hotmesh-client", scopes=[])
        return None


def has_bearer(request: Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def http_app(gateway: McpGateway, *, host: str, port: int, token: str) -> Starlette:
    """The Streamable HTTP app: ``/mcp`` and ``/metrics`` (bearer token), ``/healthz`` (no token)."""
    token = check_http_token(host, token)

    async def healthz(request: Request) -> JSONResponse:
        ok = await gateway.engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "database": ok}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> PlainTextResponse:
        if not has_bearer(request, token):  # stream and tool names are not for everyone
            return PlainTextResponse("a bearer token is required\n", status_code=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(await gateway.metrics_text(), media_type=CONTENT_TYPE)

    return gateway.server.streamable_http_app(
        streamable_http_path="/mcp",
        host=host,  # loopback hosts get the SDK's DNS-rebinding protection (Host and Origin checks)
        token_verifier=StaticTokenVerifier(token),
        # A static bearer token: there is no authorization server to advertise, so no protected-resource
        # metadata (resource_server_url=None); issuer_url is then unused, but the settings require one.
        auth=AuthSettings(
            issuer_url="http://localhost", resource_server_url=None, validate_token_resource=False  # type: ignore[arg-type]
        ),
        custom_starlette_routes=[Route("/healthz", healthz, methods=["GET"]),
                                 Route("/metrics", metrics, methods=["GET"])],
    )


class _Uvicorn:
    """uvicorn without its own signal handlers: ``serve`` owns SIGINT/SIGTERM and stops it gracefully."""

    @staticmethod
    def make(app: Starlette, host: str, port: int) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", log_config=None))


async def run_http(
    gateway: McpGateway, *, host: str, port: int, token: str, stop: anyio.Event | None = None,
    started: anyio.Event | None = None,
) -> None:
    """Serve Streamable HTTP with uvicorn until ``stop`` is set (then finish the requests in flight)."""
    server = _Uvicorn.make(http_app(gateway, host=host, port=port, token=token), host, port)
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while not server.started:  # noqa: ASYNC110 - uvicorn has no event for this
                await anyio.sleep(0.02)
            log.info("serving MCP over Streamable HTTP at http://%s:%d/mcp", host, port)
            if started is not None:
                started.set()
            if stop is not None:
                await stop.wait()
                server.should_exit = True

        tg.start_soon(watch)
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits when it cannot bind
            raise ConfigError(f"could not serve HTTP on {host}:{port} (is the port in use?)") from None
        finally:
            tg.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------- entry
async def serve(args: Any) -> None:
    """``mcp-hotmesh serve``: start the gateway (see ``gateway_serve``) and serve the chosen transport."""
    from .gateway_serve import running_gateway

    if args.transport == "http":
        check_http_token(args.host, args.token)  # refuse before starting anything
    stop = anyio.Event()
    with contextlib.ExitStack() as outputs:
        wire = outputs.enter_context(protocol_stdout()) if args.transport == "stdio" else None
        async with running_gateway(args) as engine, anyio.create_task_group() as tg:
            gateway = McpGateway(engine)

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("received %s; stopping", signal.Signals(signum).name)
                        stop.set()
                        if args.transport != "http":
                            tg.cancel_scope.cancel()

            tg.start_soon(on_signal)
            # retention: this process purges the finished calls of its streams now and then (bounded, locked)
            tg.start_soon(lambda: retention_loop(engine.api.pool, engine.schema, "caller",
                                                 interval=float(getattr(args, "purge_interval", 60.0))))
            tg.start_soon(watchdog_loop, engine.api.pool, engine.schema, "caller")
            if args.transport == "http":
                await run_http(gateway, host=args.host, port=args.port, token=args.token, stop=stop)
            else:
                await run_stdio(gateway, wire)
            tg.cancel_scope.cancel()
