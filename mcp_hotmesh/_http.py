"""The Streamable HTTP transport and its authentication: ``/mcp`` and ``/metrics`` behind a bearer token,
``/healthz`` open, served by uvicorn; DNS-rebinding protection on loopback hosts."""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import logging
import socket
from collections.abc import Iterator
from typing import Any

import anyio
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from ._mcp_server import McpGateway
from ._metrics import CONTENT_TYPE
from ._resume import Resumable
from .errors import ConfigError, TransportError

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16


# ----------------------------------------------------------------------------------------------- HTTP
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that is taken (or an address that is not this machine's) before anything else starts: the
    embedded server, migrations, new role passwords. uvicorn binds it a moment later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise TransportError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}"
                                 f"{' (is another server using it?)' if exc.errno == errno.EADDRINUSE else ''}"
                                 ) from None


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


def http_app(gateway: McpGateway, *, host: str, port: int, token: str) -> ASGIApp:
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

    app = gateway.server.streamable_http_app(
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
    # a client whose connection dropped mid-call reconnects with Last-Event-ID and gets the rest (_resume)
    return Resumable(app, gateway.engine, gateway.result_of, path="/mcp",
                     authorized=lambda scope: has_bearer(Request(scope), token))


class _Uvicorn:
    """uvicorn without its own signal handlers: ``serve`` owns SIGINT/SIGTERM and stops it gracefully."""

    @staticmethod
    def make(app: ASGIApp, host: str, port: int) -> Any:
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
            raise TransportError(f"could not serve HTTP on {host}:{port} (is the port in use?)") from None
        finally:
            tg.cancel_scope.cancel()
