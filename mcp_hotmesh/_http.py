"""The Streamable HTTP transport and its authentication: ``/mcp`` and ``/metrics`` behind a bearer token,
``/healthz`` open, served by uvicorn; DNS-rebinding protection on loopback hosts and the ``--allowed-host`` names.

One static token (``--token``) for a single caller, or, for a gateway serving identities, its verifier
(``_identity``): admin-issued tokens and OAuth JWTs, with the protected-resource metadata (RFC 9728) and the
``WWW-Authenticate`` challenge the MCP authorization specification asks for."""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import logging
import re
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Scope

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


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")


def transport_security(host: str, allowed_hosts: Sequence[str]) -> TransportSecuritySettings | None:
    """DNS-rebinding protection for the names clients reach this server by (``--allowed-host``, with or without a
    port); None: the SDK's own, which protects loopback hosts only."""
    if not allowed_hosts:
        return None
    names = []
    for name in allowed_hosts:
        if not _HOST.match(name):
            raise ConfigError(f"--allowed-host {name!r} is not a host name (give NAME or NAME:PORT, no scheme)")
        names.append(name)
    if is_loopback(host):
        names += ["127.0.0.1", "localhost", "[::1]"]
    hosts, origins = [], []
    for name in names:
        ported = bool(re.search(r":\d+$", name))
        hosts += [name] if ported else [name, f"{name}:*"]
        for scheme in ("https", "http"):
            origins += [f"{scheme}://{name}"] if ported else [f"{scheme}://{name}", f"{scheme}://{name}:*"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


def http_app(gateway: McpGateway, *, host: str, port: int, token: str | None,
             allowed_hosts: Sequence[str] = ()) -> ASGIApp:
    """The Streamable HTTP app: ``/mcp`` and ``/metrics`` (bearer token), ``/healthz`` (no token). A gateway
    serving identities brings its own verifier (``verifier``); ``token`` is then only ``/metrics``'s."""
    verifier: TokenVerifier | None = getattr(gateway, "verifier", None)
    if verifier is None or token:
        token = check_http_token(host, token)
    verifier = verifier or StaticTokenVerifier(token or "")
    oauth = getattr(gateway, "oauth", None)

    async def healthz(request: Request) -> JSONResponse:
        ok = await gateway.engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "database": ok}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> PlainTextResponse:
        if not token or not has_bearer(request, token):  # stream and tool names are not for everyone
            return PlainTextResponse("a bearer token is required\n", status_code=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(await gateway.metrics_text(), media_type=CONTENT_TYPE)

    app = gateway.server.streamable_http_app(
        streamable_http_path="/mcp",
        host=host,  # loopback hosts get the SDK's DNS-rebinding protection (Host and Origin checks)
        transport_security=transport_security(host, allowed_hosts),
        token_verifier=verifier,
        # With OAuth the issuer and this resource are advertised (/.well-known/oauth-protected-resource/mcp, and
        # resource_metadata in every 401's WWW-Authenticate); the audience is checked on the JWT itself. Without,
        # there is no authorization server to advertise: issuer_url is then unused, but the settings require one.
        auth=AuthSettings(
            issuer_url=oauth.issuer, resource_server_url=oauth.resource, validate_token_resource=False
        ) if oauth is not None else AuthSettings(
            issuer_url="http://localhost", resource_server_url=None, validate_token_resource=False  # type: ignore[arg-type]
        ),
        custom_starlette_routes=[Route("/healthz", healthz, methods=["GET"]),
                                 Route("/metrics", metrics, methods=["GET"])],
    )
    # a client whose connection dropped mid-call reconnects with Last-Event-ID and gets the rest (_resume)
    async def verified(scope: Scope) -> AccessToken | None:
        scheme, _, given = Request(scope).headers.get("authorization", "").partition(" ")
        return await verifier.verify_token(given.strip()) if scheme.lower() == "bearer" and given.strip() else None

    return Resumable(app, gateway.engine_for, gateway.result_of, path="/mcp", verified=verified)


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
    gateway: McpGateway, *, host: str, port: int, token: str | None, stop: anyio.Event | None = None,
    started: anyio.Event | None = None, allowed_hosts: Sequence[str] = (),
) -> None:
    """Serve Streamable HTTP with uvicorn until ``stop`` is set (then finish the requests in flight)."""
    app = http_app(gateway, host=host, port=port, token=token, allowed_hosts=allowed_hosts)
    if not is_loopback(host):
        log.warning("serving plain HTTP on the non-loopback address %s: bearer tokens cross the network in clear "
                    "text unless a TLS-terminating proxy is in front (serve it under its name with --allowed-host)",
                    host)
    server = _Uvicorn.make(app, host, port)
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
