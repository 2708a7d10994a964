"""Resumable Streamable HTTP: a client whose connection dropped mid-call reconnects and gets the rest of it.

Handshake-era clients (2025-11-25 and earlier; the 2026-07-28 transport has no resumption, tasks do that job)
receive a ``tools/call`` answer on the POST's SSE stream. This ASGI layer, in front of the SDK's app:

* starts the stream of a ``tools/call`` (from a client that negotiated 2025-11-25 or later) with a priming
  event (an id, empty data) and a ``retry`` field, so a client knows it may reconnect and how soon;
* once the call is queued, sends one more empty event whose id names the call and the JSON-RPC request:
  ``<call id>:<request id as JSON>``. Everything the rest of the stream holds is derived from the call's row;
* answers ``GET /mcp`` with such a ``Last-Event-ID`` itself, before the SDK looks for a session: it waits for
  the call (``Engine.follow``, as the caller role: another role's call is "not found") and sends its answer
  as the JSON-RPC response to the request the id names. Any gateway logged in as the same role can do it, the
  one that took the POST may be gone; a dropped connection does not stop the call meanwhile.

The bearer token is checked here for the GETs this layer answers (the SDK checks it for everything else), and
the call is looked up as the caller role that token acts as (a gateway serving identities has one per role).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio
from mcp.server.auth.provider import AccessToken
from mcp.types import CallToolResult
from mcp.types.version import MODERN_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._caller import Engine, Outcome
from .errors import HotMeshError, NotFound

log = logging.getLogger(__name__)

SCOPE_KEY = "hotmesh.resume"
RETRY_MS = 2000
"""How long a client waits before it reconnects (the SSE ``retry`` field)."""
RESUMABLE_FROM = "2025-11-25"
"""The first protocol version whose clients read a priming event (an event with no data)."""
PING_SECONDS = 15.0
"""A resumed stream says something this often while its call runs (a comment), so no proxy drops it as idle."""


@dataclass
class StreamState:
    """What a ``tools/call`` handler tells this layer: that it began, on a connection of which protocol version,
    and the call its request queued."""

    resumable: bool = False
    event_id: str | None = None
    begun: anyio.Event = field(default_factory=anyio.Event)
    queued: anyio.Event = field(default_factory=anyio.Event)

    def begin(self, protocol_version: str) -> None:
        self.resumable = protocol_version >= RESUMABLE_FROM  # the versions are dates: they sort as text
        self.begun.set()

    def enqueued(self, call_id: UUID, request_id: Any) -> None:
        self.event_id = f"{call_id}:{json.dumps(request_id)}"
        self.queued.set()


def stream_state(request: Any) -> StreamState | None:
    """The resumable stream a request's handler runs in, if any (``ctx.request``: the Starlette request)."""
    scope = getattr(request, "scope", None)
    state = scope.get(SCOPE_KEY) if isinstance(scope, dict) else None
    return state if isinstance(state, StreamState) else None


def _parse(event_id: str) -> tuple[UUID, Any] | None:
    ident, sep, request = event_id.partition(":")
    if not sep:
        return None
    try:
        request_id = json.loads(request)
        return UUID(ident), request_id
    except ValueError:
        return None


def _event(data: str = "", *, ident: str | None = None, retry: bool = False) -> bytes:
    lines = []
    if ident is not None:
        lines.append(f"id: {ident}")
    if retry:
        lines.append(f"retry: {RETRY_MS}")
    if data:
        lines += ["event: message", f"data: {data}"]
    else:
        lines.append("data: ")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Resumable:
    """The ASGI layer (see the module's docstring) in front of ``app``, which serves MCP at ``path``."""

    def __init__(self, app: ASGIApp, engine_for: Callable[[AccessToken], AbstractAsyncContextManager[Engine]],
                 result_of: Callable[[Outcome], CallToolResult], *, path: str,
                 verified: Callable[[Scope], Awaitable[AccessToken | None]]) -> None:
        self.app, self.engine_for, self.result_of = app, engine_for, result_of
        self.path, self.verified = path, verified

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if headers.get("mcp-protocol-version") in MODERN_PROTOCOL_VERSIONS:
            await self.app(scope, receive, send)  # that transport has no resumption
            return
        if scope.get("method") == "GET" and (parsed := _parse(headers.get("last-event-id", ""))) is not None:
            await self._resume(scope, receive, send, headers["last-event-id"], *parsed)
        elif scope.get("method") == "POST":
            await self._post(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The SDK answers. A ``tools/call`` stream of a client that negotiated 2025-11-25 or later gets a priming
        event before anything else, and the call's event once it is queued (earlier clients may not read an event
        with no data, as the SDK has it)."""
        state = scope[SCOPE_KEY] = StreamState()
        lock = anyio.Lock()
        streaming = anyio.Event()  # the SDK started an SSE response (the call may be queued before or after)
        primed = ended = False

        async def prime() -> None:  # with the lock held
            nonlocal primed
            if streaming.is_set() and state.resumable and not primed and not ended:
                await send({"type": "http.response.body", "body": _event(ident="0", retry=True), "more_body": True})
                primed = True

        async def relay(message: Message) -> None:
            nonlocal ended
            async with lock:
                if ended:
                    return
                if message["type"] == "http.response.body":
                    await prime()  # before anything the SDK writes
                await send(message)
                if message["type"] == "http.response.start":
                    types = {k.lower(): v for k, v in message.get("headers", [])}.get(b"content-type", b"")
                    if message.get("status") == 200 and types.startswith(b"text/event-stream"):
                        streaming.set()
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    ended = True

        async def announce() -> None:
            await state.begun.wait()
            await streaming.wait()
            async with lock:
                await prime()
            await state.queued.wait()
            async with lock:
                if primed and not ended and state.event_id is not None:
                    await send({"type": "http.response.body", "body": _event(ident=state.event_id),
                                "more_body": True})

        async with anyio.create_task_group() as tg:
            tg.start_soon(announce)
            try:
                await self.app(scope, receive, relay)
            finally:
                tg.cancel_scope.cancel()

    async def _resume(self, scope: Scope, receive: Receive, send: Send, last: str, call_id: UUID,
                      request_id: Any) -> None:
        """The rest of the stream a POST started: the call's answer, once it has one."""
        who = await self.verified(scope)
        if who is None:
            await _plain(send, 401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
            return
        try:
            async with self.engine_for(who) as engine:
                await self._resume_as(engine, receive, send, last, call_id, request_id)
        except HotMeshError as exc:
            log.warning("resuming call %s: %s", call_id, exc)
            await _plain(send, 503, "the tool service is unreachable right now; reconnect shortly")

    async def _resume_as(self, engine: Engine, receive: Receive, send: Send, last: str, call_id: UUID,
                         request_id: Any) -> None:
        try:
            known = await engine.api.status(call_id) is not None
        except HotMeshError as exc:
            log.warning("resuming call %s: %s", call_id, exc)
            await _plain(send, 503, "the tool service is unreachable right now; reconnect shortly")
            return
        if not known:  # another role's call, or none: the same answer
            await _plain(send, 404, "no such call")
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache, no-transform")]})
        await send({"type": "http.response.body", "body": _event(ident=last, retry=True), "more_body": True})
        outcome: Outcome | None = None
        gone = False
        async with anyio.create_task_group() as tg:

            async def disconnected() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(disconnected)
            outcome = await self._wait(engine, call_id, send)
            tg.cancel_scope.cancel()
        if gone:
            return
        if outcome is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        result = self.result_of(outcome).model_dump(by_alias=True, mode="json", exclude_none=True)
        answer = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}, ensure_ascii=False)
        await send({"type": "http.response.body", "body": _event(answer), "more_body": False})

    async def _wait(self, engine: Engine, call_id: UUID, send: Send) -> Outcome | None:
        """The call's outcome once it ends (None: it is gone), with a comment on the stream now and then."""
        while True:
            try:
                outcome = await engine.follow(call_id, seconds=PING_SECONDS)
            except NotFound:  # purged meanwhile
                return None
            except HotMeshError as exc:  # the database is away a moment: keep the client waiting
                log.warning("resuming call %s: %s", call_id, exc)
                outcome = None
            if outcome is not None:
                return outcome
            await send({"type": "http.response.body", "body": b": the call is still running\r\n\r\n",
                        "more_body": True})


async def _plain(send: Send, status: int, text: str, headers: dict[str, str] | None = None) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), *extra]})
    await send({"type": "http.response.body", "body": text.encode() + b"\n", "more_body": False})
