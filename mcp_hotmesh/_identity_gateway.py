"""The MCP gateway when it serves several identities over HTTP (``serve --identity-config FILE``).

Each request's bearer token is verified (``_identity.IdentityVerifier``: an admin-issued token or a JWT) and names
an identity and the caller role it acts as. Its ``tools/list`` and ``tools/call`` then run on that role's own
engine (``_role_engines``): the database decides what the identity may see and call, and whose calls it may read
or cancel. Around each call: the identity's quotas (``_quotas``) and one audit record (``_audit``).

It is ``McpGateway`` with ``engine`` read per request (a context variable set around each handler), so the MCP
handling itself is the same code for one caller and for many.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.abc
from mcp import MCPError
from mcp.server import ServerRequestContext
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.types import (
    INTERNAL_ERROR,
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
)

from ._audit import AuditRecord, AuditTrail
from ._caller import Engine, Outcome
from ._identity import Identity, IdentityConfig, IdentityVerifier
from ._keepalive import DEFAULT_INTERVAL
from ._mcp_server import McpGateway, error_result, request_token
from ._metrics import UNKNOWN
from ._quotas import Quotas, Refusal
from ._role_engines import RoleEngines, RoleUnavailable
from .errors import Busy

log = logging.getLogger(__name__)

_engine: ContextVar[Engine | None] = ContextVar("hotmesh_identity_engine", default=None)
_identity: ContextVar[Identity | None] = ContextVar("hotmesh_identity", default=None)


def identity_of(ctx: ServerRequestContext[Any, Any]) -> Identity | None:
    """The verified identity of this request."""
    token = request_token(ctx)
    return token if isinstance(token, Identity) else None


class IdentityGateway(McpGateway):
    """``McpGateway`` serving each verified identity as its own caller role. Start ``run`` in a task group."""

    def __init__(self, engine: Engine, config: IdentityConfig, *, keepalive: float = DEFAULT_INTERVAL) -> None:
        self._base = engine
        super().__init__(engine, keepalive=keepalive)
        self.config = config
        self.oauth = config.oauth
        self.verifier = IdentityVerifier(engine.api.pool, engine.schema, config.oauth)
        self.quotas = Quotas(config.quotas)
        self.engines = RoleEngines(
            engine, engine.dsn, config.logins, max_roles=config.max_roles, pool_size=config.pool_size,
            idle_seconds=config.idle_seconds, on_tools_changed=self.notify_tools_changed, on_close=self._closing,
        )
        self.audit = AuditTrail(engine.schema, self.engines.pool_of)
        self.server.get_tool_input_schema = self._input_schema

    @property
    def engine(self) -> Engine:
        """This request's identity's engine; the gateway's own outside requests (health, metrics, retention)."""
        return _engine.get() or self._base

    @engine.setter
    def engine(self, value: Engine) -> None:
        self._base = value

    async def run(self, *, task_status: anyio.abc.TaskStatus[IdentityGateway] = anyio.TASK_STATUS_IGNORED) -> None:
        """The role engines and the audit writer, until cancelled."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.engines.run)
            tg.start_soon(self.audit.run)
            task_status.started(self)

    @contextlib.asynccontextmanager
    async def engine_for(self, who: AccessToken | None) -> AsyncIterator[Engine]:
        """The identity's own caller role's engine (tasks, resumed streams); raises ``RoleUnavailable`` for a
        request that carries no identity."""
        if not isinstance(who, Identity):
            raise RoleUnavailable("this request carries no verified identity")
        async with self.engines.use(who.role) as engine:
            yield engine

    async def _closing(self, role: str, pool: Any) -> None:
        await self.audit.flush(role, pool)

    def listing_engine(self, ctx: ServerRequestContext[Any, Any]) -> Engine | None:
        """The identity's role's engine, if it runs (else the handler starts it: no cached listing then)."""
        who = identity_of(ctx)
        return self.engines.engine_of(who.role) if who is not None else None

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        """For the SDK's check of ``Mcp-Param-*`` headers, before dispatch: the tool as this identity's role sees
        it, if its engine is up (otherwise the check is skipped; the engine checks the arguments anyway)."""
        who = get_access_token()
        engine = self.engines.engine_of(who.role) if isinstance(who, Identity) else None
        return engine.input_schema(name) if engine is not None else None

    # ----------------------------------------------------------------------------------------- handlers
    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        who = identity_of(ctx)
        if who is None:
            raise MCPError(INTERNAL_ERROR, "this request carries no verified identity")
        try:
            async with self.engines.use(who.role) as engine:
                token = _engine.set(engine)
                try:
                    return await super()._list_tools(ctx, params)
                finally:
                    _engine.reset(token)
        except (RoleUnavailable, Busy) as exc:
            raise MCPError(INTERNAL_ERROR, exc.message) from None

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> CallToolResult:
        who = identity_of(ctx)
        if who is None:
            raise MCPError(INTERNAL_ERROR, "this request carries no verified identity")
        started = time.monotonic()
        try:
            async with self.engines.use(who.role) as engine:
                tool = params.name if engine.input_schema(params.name) is not None else UNKNOWN
                admitted = self.quotas.admit(who.name, tool)
                if isinstance(admitted, Refusal):
                    self.metrics.observe(tool, "quota", time.monotonic() - started)
                    self._record(who, params, tool, "quota", time.monotonic() - started, None)
                    return error_result(admitted.message)
                tokens = _engine.set(engine), _identity.set(who)
                try:
                    return await super()._call_tool(ctx, params)
                finally:
                    admitted.release()
                    _engine.reset(tokens[0])
                    _identity.reset(tokens[1])
        except (RoleUnavailable, Busy) as exc:
            self._record(who, params, UNKNOWN, "unavailable", time.monotonic() - started,
                         None)
            return error_result(exc.message)

    def after_call(self, params: CallToolRequestParams, tool: str, label: str, seconds: float,
                   outcome: Outcome | None) -> None:
        who = _identity.get()
        if who is not None:
            self._record(who, params, tool, label, seconds, outcome)

    def _record(self, who: Identity, params: CallToolRequestParams, tool: str, label: str, seconds: float,
                outcome: Outcome | None) -> None:
        try:
            args_bytes = len(json.dumps(params.arguments or {}, ensure_ascii=False).encode())
        except (TypeError, ValueError, RecursionError):
            args_bytes = 0
        result_bytes = 0
        if outcome is not None:
            try:
                result_bytes = len((json.dumps(outcome.result, ensure_ascii=False) if outcome.result is not None
                                    else outcome.error or "").encode())
            except (TypeError, ValueError, RecursionError):
                result_bytes = 0
        self.audit.record(AuditRecord(
            at=datetime.now(UTC) - timedelta(seconds=seconds), identity=who.name, role=who.role, tool=tool,
            call_id=outcome.call_id if outcome is not None else None, outcome=label, duration_ms=seconds * 1000,
            args_bytes=args_bytes, result_bytes=result_bytes,
            arguments=params.arguments if self.config.audit_arguments else None,
        ))

    async def metrics_text(self) -> str:
        return await super().metrics_text() + self.quotas.render()
