"""The gateway through the real ``mcp`` client, in-process, in both protocol eras, against real PostgreSQL.

The gateway logs in as a caller role, the worker as a worker role, each with its own password over TCP; the
worker serves ``helpers.GATEWAY_TOOLS`` (the example tools, ``test_fail`` and ``test_block``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest
from mcp import Client, MCPError
from mcp.client.session import IncomingMessage
from mcp.types import INVALID_PARAMS, CallToolResult, ToolListChangedNotification

from mcp_hotmesh._streams import WorkerAPI
from tests.helpers import GATEWAY_TOOLS, Env, Hub, block_cancellations, hub_for, text_of, wait_for

pytestmark = pytest.mark.anyio

LATER = "test.later"  # the caller may use it; its tool is registered during a test


@pytest.fixture
async def hub(env: Env) -> AsyncIterator[Hub]:
    async with hub_for(env, extra_streams=[LATER]) as h:
        yield h


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ------------------------------------------------------------------------------------------------ tests
async def test_list_is_the_registry_on_the_callers_streams(hub: Hub, mode: str) -> None:
    # a tool on a stream the caller role may not use is registered, but not listed
    _, other = await hub.env.worker(["secret"])
    await other.register_tool("secret", "", {"name": "secret_tool", "description": "hidden",
                                             "input_schema": {"type": "object"}})
    async with Client(hub.gateway.server, mode=mode) as client:
        assert client.server_capabilities is not None and client.server_capabilities.tools is not None
        assert client.server_capabilities.tools.list_changed is True
        listed = {t.name: t for t in (await client.list_tools()).tools}
    assert sorted(listed) == sorted(t.name for t in GATEWAY_TOOLS.tools)
    for t in GATEWAY_TOOLS.tools:
        assert listed[t.name].description == t.description
        assert listed[t.name].input_schema == t.input_schema
        assert listed[t.name].output_schema == t.output_schema
    assert {"math_add", "math_multiply"} <= set(listed)  # one topic, two tools by workflow name


async def test_list_changed_reaches_modern_clients(hub: Hub) -> None:
    _, later = await hub.env.worker([LATER])
    async with Client(hub.gateway.server) as client, client.listen(tools_list_changed=True) as events:
        assert LATER.replace(".", "_") not in [t.name for t in (await client.list_tools()).tools]
        await later.register_tool(LATER, "", {"name": "later", "description": "new",
                                              "input_schema": {"type": "object"}})
        with anyio.fail_after(5):
            await events.__anext__()
        assert "later" in [t.name for t in (await client.list_tools()).tools]


async def test_list_changed_reaches_legacy_clients(hub: Hub) -> None:
    changed = anyio.Event()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.set()

    _, later = await hub.env.worker([LATER])
    async with Client(hub.gateway.server, mode="legacy", message_handler=on_message) as client:
        await client.list_tools()
        await later.register_tool(LATER, "", {"name": "later", "description": "new",
                                              "input_schema": {"type": "object"}})
        with anyio.fail_after(5):
            await changed.wait()
        assert "later" in [t.name for t in (await client.list_tools()).tools]


async def test_structured_result(hub: Hub, mode: str) -> None:
    async with Client(hub.gateway.server, mode=mode) as client:
        result = await client.call_tool("echo", {"text": "héllo"})
        assert not result.is_error
        assert result.structured_content == {"text": "héllo", "length": 5}
        assert json.loads(text_of(result)) == {"text": "héllo", "length": 5}
        product = await client.call_tool("math_multiply", {"a": 6, "b": 7})
        assert product.structured_content == {"result": 42}


async def test_invalid_arguments_are_refused_before_anything_is_enqueued(hub: Hub, mode: str) -> None:
    async with Client(hub.gateway.server, mode=mode) as client:
        wrong_type = await client.call_tool("echo", {"text": 5})
        missing = await client.call_tool("math_add", {"a": 1})
        extra = await client.call_tool("echo", {"text": "x", "colour": "red"})
        out_of_range = await client.call_tool("sleep", {"seconds": -1})
    for result in (wrong_type, missing, extra, out_of_range):
        assert result.is_error
    assert "text: 5 is not of type 'string'" in text_of(wrong_type)
    assert "'b' is a required property" in text_of(missing)
    assert "colour" in text_of(extra)
    assert "seconds" in text_of(out_of_range)
    assert await hub.rows() == 0


async def test_oversized_arguments_are_refused(hub: Hub) -> None:
    async with Client(hub.gateway.server) as client:
        result = await client.call_tool("echo", {"text": "x" * 5000})
    assert result.is_error
    assert "at most 4096" in text_of(result)
    assert await hub.rows() == 0


async def test_unknown_tool_is_invalid_params(hub: Hub, mode: str) -> None:
    async with Client(hub.gateway.server, mode=mode) as client:
        with pytest.raises(MCPError) as exc:
            await client.call_tool("no_such_tool", {})
    assert exc.value.code == INVALID_PARAMS
    assert "no_such_tool" in exc.value.message


async def test_handler_failure_is_an_error_result_without_internals(hub: Hub, mode: str) -> None:
    async with Client(hub.gateway.server, mode=mode) as client:
        result = await client.call_tool("test_fail", {"reason": "the widget is broken"})
    assert result.is_error
    text = text_of(result)
    assert "the widget is broken" in text
    for secret in ("Traceback", "SELECT", "postgresql://", hub.caller.role, hub.caller.password, hub.env.schema):
        assert secret not in text


async def test_flaky_tool_succeeds_on_retry(hub: Hub) -> None:
    async with Client(hub.gateway.server) as client:
        result = await client.call_tool("flaky", {})
    assert not result.is_error and result.structured_content is not None
    assert result.structured_content["attempt"] == 1


async def test_progress_is_forwarded(hub: Hub, mode: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(hub.gateway.server, mode=mode) as client:
        result = await client.call_tool("sleep", {"seconds": 0.9, "steps": 3}, progress_callback=on_progress)
    assert not result.is_error
    assert seen, "no progress arrived"
    assert [p for p, _, _ in seen] == sorted({p for p, _, _ in seen})  # increasing
    assert all(total == 3 for _, total, _ in seen)
    assert seen[0][2] is not None and seen[0][2].startswith("step ")


async def test_timeout_cancels_the_call(env: Env) -> None:
    async with hub_for(env, call_timeout=0.5) as hub, Client(hub.gateway.server) as client:
        started = time.monotonic()
        result = await client.call_tool("sleep", {"seconds": 30})
        assert time.monotonic() - started < 5
        assert result.is_error
        assert "did not finish within 0.5 seconds" in text_of(result)
        row = await env.admin.fetchrow(f'SELECT state, cancel_requested FROM "{env.schema}".messages')
        assert row is not None and row["cancel_requested"]

        async def expired() -> bool:  # it ended expired, not dead-lettered; the worker stopped the handler
            return bool(await env.admin.fetchval(f'SELECT state FROM "{env.schema}".messages') == "expired")

        await wait_for(expired, 10)


async def test_client_cancellation_reaches_the_handler(hub: Hub, mode: str) -> None:
    before = block_cancellations["count"]
    async with Client(hub.gateway.server, mode=mode) as client:
        with anyio.move_on_after(0.5):
            await client.call_tool("test_block", {})

        async def handler_cancelled() -> bool:
            return block_cancellations["count"] > before

        await wait_for(handler_cancelled, 10)
        row = await hub.env.admin.fetchrow(f'SELECT state, cancel_requested FROM "{hub.env.schema}".messages')
        assert row is not None and row["cancel_requested"]
        assert not (await client.call_tool("echo", {"text": "still here"})).is_error


async def test_a_tool_without_a_live_worker_fails_at_once(hub: Hub) -> None:
    role = await hub.env.provision([LATER], "worker")
    api = WorkerAPI(await hub.env.pool(role), hub.env.schema)  # registers, but never runs
    await api.register_tool(LATER, "", {"name": "later", "description": "nobody runs this",
                                        "input_schema": {"type": "object"}})
    async with Client(hub.gateway.server) as client:

        async def listed() -> bool:  # all the same; once the registry's NOTIFY has refreshed the cache
            return "later" in [t.name for t in (await client.list_tools()).tools]

        await wait_for(listed, 5)
        started = time.monotonic()
        result = await client.call_tool("later", {})
        assert time.monotonic() - started < 2
    assert result.is_error
    assert "offline" in text_of(result)
    assert await hub.rows() == 0


async def test_listen_reconnect_rechecks_the_waiting_calls(env: Env) -> None:
    """Notifications sent while the LISTEN connection is down are lost: after a reconnect every waiting call
    looks again. The slow timer is set far away here, so only the reconnect can finish the call in time."""
    async with hub_for(env, recheck_interval=30) as hub, Client(hub.gateway.server) as client:
        listener = hub.engine.listener
        heard = listener._handler
        # deaf to call notifications from now on (as if they were sent while disconnected)
        listener._handler = lambda channel, payload: None if payload[:2] in ("r:", "p:") else heard(channel, payload)
        results: list[CallToolResult] = []

        async def call() -> None:
            results.append(await client.call_tool("sleep", {"seconds": 0.3, "steps": 1}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)

            async def finished() -> bool:
                return bool(await env.admin.fetchval(
                    f"SELECT count(*) FROM \"{env.schema}\".messages WHERE state = 'done'"))

            await wait_for(finished)
            await anyio.sleep(0.2)
            assert not results  # the answer is there, but the gateway did not hear of it
            started = time.monotonic()
            await env.admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'LISTEN%'",
                hub.caller.role)
        assert time.monotonic() - started < 5
        assert listener.reconnects == 1
        assert results[0].structured_content == {"seconds": 0.3, "steps": 1}
        listener._handler = heard
        assert not (await client.call_tool("echo", {"text": "after the reconnect"})).is_error


async def test_a_second_gateway_does_not_take_over_the_first_ones_roles(env: Env) -> None:
    from mcp_hotmesh._serve import ServeOptions, running_gateway

    args = ServeOptions(dsn=env.server.admin_dsn, schema=env.schema, no_worker=True, timeout=5.0)
    async with running_gateway(args) as first, running_gateway(args) as second:
        assert first.role == f"{env.schema}_c_gateway"
        assert second.role == f"{env.schema}_c_gateway_2"
        assert isinstance(first.api.pool, asyncpg.Pool)
        await first.api.pool.expire_connections()  # new logins: the first one's password still works
        assert await first.refresh() is False
        assert await first.healthy() and await second.healthy()
