"""MCP Tasks, served from the calls in PostgreSQL: a task is a call.

Two dialects of one feature, both on the SDK's low-level server (it has no Tasks runtime):

* the ``io.modelcontextprotocol/tasks`` extension (2026-07-28): a client that declares the extension in its
  request's capabilities may get ``resultType: "task"`` instead of a ``CallToolResult``; it polls ``tasks/get``
  (the result or error inline once the task ends), may ``tasks/cancel``, and ``tasks/update`` has nothing to
  answer (these tools never ask for input). The server decides: a call that has not ended within
  ``TASK_AFTER`` seconds becomes a task, a quicker one answers as usual;
* the task-augmented ``tools/call`` of 2025-11-25: a request with ``params.task`` always gets a
  ``CreateTaskResult``; ``tasks/get``, the blocking ``tasks/result`` and ``tasks/cancel`` follow. The server
  advertises ``capabilities.tasks`` (no ``tasks/list``) and every tool ``execution.taskSupport: "optional"``.

The task id is the call id. The call is enqueued with a durable commit (``caller_call_durable``) before its id
is handed out, so the task exists once a client knows of it. Its state, progress, result and cancellation are
the call's row, read through the caller role: any gateway logged in as the same role answers for it (the
request, the client's connection and the gateway process that created it may all be gone), and a task is
visible to no other role (the database says "no such call" alike for another role's call and for none).
Nothing here lists tasks. A task's time to live is its call's time limit: the call ends (expired) at its
deadline, and its answer is kept at least that long.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
from mcp import MCPError
from mcp.server import ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.types import INVALID_PARAMS, CallToolRequestParams, CallToolResult, RequestParams
from mcp.types.version import MODERN_PROTOCOL_VERSIONS
from mcp_types import methods as wire
from pydantic import ConfigDict, ValidationError

from ._caller import Engine, Outcome
from ._keepalive import describe
from ._streams import CallStatus
from .errors import HotMeshError, NotFound, UnknownTool

log = logging.getLogger(__name__)

EXTENSION = "io.modelcontextprotocol/tasks"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
RELATED_TASK = "io.modelcontextprotocol/related-task"
REQUEST_TIMEOUT = -32001  # the JSON-RPC error of a request that ran out of time, as the SDKs use it
TASK_AFTER = 1.0
"""Seconds a 2026-07-28 client that accepts tasks waits for the answer before its call becomes a task."""
POLL_MS = 2000
"""The polling interval suggested to clients, in milliseconds."""


class TaskParams(RequestParams):
    """``tasks/get``, ``tasks/result``, ``tasks/cancel`` and ``tasks/update``: the task's id."""

    model_config = ConfigDict(extra="allow")
    task_id: str


def _wants_task(ctx: ServerRequestContext[Any, Any], params: dict[str, Any]) -> bool:
    """Whether this ``tools/call`` may become a task: a 2026-07-28 client declared the extension in the request's
    capabilities; an earlier one augmented the request with ``task``."""
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        meta = params.get("_meta")
        caps = meta.get(CAPABILITIES_KEY) if isinstance(meta, dict) else None
        extensions = caps.get("extensions") if isinstance(caps, dict) else None
        return isinstance(extensions, dict) and EXTENSION in extensions
    return isinstance(params.get("task"), dict)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _call_id(task_id: str) -> UUID:
    try:
        return UUID(task_id)
    except ValueError:
        raise MCPError(INVALID_PARAMS, "No such task.") from None


class Tasks:
    """The Tasks runtime of one gateway: a middleware that turns a ``tools/call`` into a task, and the
    ``tasks/*`` handlers. ``result_of`` is how the gateway turns a call's outcome into a ``CallToolResult``."""

    def __init__(self, engine_for: Callable[[ServerRequestContext[Any, Any]], AbstractAsyncContextManager[Engine]],
                 result_of: Callable[[Outcome], CallToolResult]) -> None:
        self.engine_for = engine_for  # the engine a request acts through: its identity's caller role
        self.result_of = result_of

    @contextlib.asynccontextmanager
    async def _engine(self, ctx: ServerRequestContext[Any, Any]) -> AsyncIterator[Engine]:
        try:
            async with self.engine_for(ctx) as engine:
                yield engine
        except HotMeshError as exc:  # the identity's role cannot be served now
            raise MCPError(INVALID_PARAMS, f"The task cannot be reached right now: {exc.message}") from None

    def install(self, server: Any) -> None:
        server.middleware.append(self.middleware)
        server.extensions[EXTENSION] = {}
        server.add_request_handler("tasks/get", TaskParams, self.get)
        server.add_request_handler("tasks/result", TaskParams, self.result)
        server.add_request_handler("tasks/cancel", TaskParams, self.cancel)
        server.add_request_handler("tasks/update", TaskParams, self.update)

    # ------------------------------------------------------------------------------------------ creation
    async def middleware(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        raw = ctx.params
        if ctx.method != "tools/call" or ctx.request_id is None or not isinstance(raw, dict):
            return await call_next(ctx)
        if not _wants_task(ctx, raw):
            return await call_next(ctx)
        try:
            params = CallToolRequestParams.model_validate(raw, by_name=False)
        except ValidationError:
            return await call_next(ctx)  # the usual path says what is wrong with it
        async with self._engine(ctx) as engine:
            return await self._create(ctx, call_next, engine, params)

    async def _create(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, engine: Engine,
                      params: CallToolRequestParams) -> HandlerResult:
        try:
            started = await engine.start(params.name, params.arguments)
        except UnknownTool as exc:
            raise MCPError(INVALID_PARAMS, exc.message) from None
        if isinstance(started, Outcome):  # refused before anything was queued: answered as usual
            return await call_next(ctx)
        call_id, _ = started
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        if modern:  # a quick call answers as usual: it need not become a task
            try:
                outcome = await engine.follow(call_id, seconds=TASK_AFTER)
            except HotMeshError:
                outcome = None
            except anyio.get_cancelled_exc_class():  # the client gave up before it had a handle: stop the call
                with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(HotMeshError):
                    await engine.api.cancel(call_id)
                raise
            if outcome is not None:
                dumped = self.result_of(outcome).model_dump(by_alias=True, mode="json", exclude_none=True)
                return wire.serialize_server_result("tools/call", ctx.protocol_version, dumped)
        status = await self._status(engine, call_id)
        task = self._task(call_id, status, modern)
        log.info("call %s became task %s", params.name, call_id)
        return {"resultType": "task", **task} if modern else {"task": task}

    # ------------------------------------------------------------------------------------------ handlers
    async def get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        call_id = _call_id(params.task_id)
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        async with self._engine(ctx) as engine:
            status = await self._status(engine, call_id)
        task = self._task(call_id, status, modern)
        if modern and status.finished:  # the extension inlines what the call returned
            if task["status"] == "failed":
                task["error"] = {"code": REQUEST_TIMEOUT, "message": task.get("statusMessage", "")}
            else:
                task["result"] = self._result(status, call_id, related=False)
        return task

    async def result(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        """2025-11-25 ``tasks/result``: waits until the task ends, then what the call returned."""
        call_id = _call_id(params.task_id)
        async with self._engine(ctx) as engine:
            try:
                await engine.follow(call_id)
            except NotFound:
                raise MCPError(INVALID_PARAMS, "No such task.") from None
            except HotMeshError as exc:
                raise MCPError(INVALID_PARAMS, f"The task's result cannot be read right now: {exc.message}") from None
            return self._result(await self._status(engine, call_id), call_id, related=True)

    async def cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        call_id = _call_id(params.task_id)
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        async with self._engine(ctx) as engine:
            try:
                before = await engine.api.cancel(call_id)
            except NotFound:
                raise MCPError(INVALID_PARAMS, "No such task.") from None
            except HotMeshError as exc:
                raise MCPError(INVALID_PARAMS, f"The task cannot be cancelled right now: {exc.message}") from None
            if modern:
                return {}  # an acknowledgement; tasks/get shows where it ended
            if before not in ("ready", "reserved"):
                raise MCPError(INVALID_PARAMS, "The task has already ended; it cannot be cancelled.")
            return self._task(call_id, await self._status(engine, call_id), modern)

    async def update(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        """These tools never ask for input: a known task's update is acknowledged and ignored."""
        async with self._engine(ctx) as engine:
            await self._status(engine, _call_id(params.task_id))
        return {}

    # ------------------------------------------------------------------------------------------- shapes
    @staticmethod
    async def _status(engine: Engine, call_id: UUID) -> CallStatus:
        try:
            status = await engine.api.status(call_id)
        except HotMeshError as exc:
            raise MCPError(INVALID_PARAMS, f"The task cannot be read right now: {exc.message}") from None
        if status is None:  # another role's call, or none: the same answer
            raise MCPError(INVALID_PARAMS, "No such task.")
        return status

    def _task(self, call_id: UUID, status: CallStatus, modern: bool) -> dict[str, Any]:
        state = status.state
        message: str | None
        if state in ("ready", "reserved"):
            kind, message = "working", describe(status, status.progress_message)
        elif state == "cancelled":
            kind, message = "cancelled", "The task was cancelled."
        elif state == "expired":
            kind, message = "failed", "The call did not finish within its time limit, so it was stopped."
        else:  # done or dead: the call returned a result (an isError one when the tool failed)
            kind, message = "completed", None
        updated = status.finished_at or status.started_at or status.created_at
        ttl = None if status.deadline is None else max(
            0, round((status.deadline - status.created_at).total_seconds() * 1000))
        task: dict[str, Any] = {"taskId": str(call_id), "status": kind, "createdAt": _iso(status.created_at),
                                "lastUpdatedAt": _iso(updated)}
        if message is not None:
            task["statusMessage"] = message
        task["ttlMs" if modern else "ttl"] = ttl
        task["pollIntervalMs" if modern else "pollInterval"] = POLL_MS
        return task

    def _result(self, status: CallStatus, call_id: UUID, *, related: bool) -> dict[str, Any]:
        outcome = Engine.outcome_of(status.as_result())
        dumped = self.result_of(outcome).model_dump(by_alias=True, mode="json", exclude_none=True)
        if related:
            dumped["_meta"] = {**dumped.get("_meta", {}), RELATED_TASK: {"taskId": str(call_id)}}
        return dumped

