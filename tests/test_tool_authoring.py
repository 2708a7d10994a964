"""Writing tools: names, metadata, errors, retries, idempotency, through the real ``mcp`` client.

The README's own tool module (its "Workers" section) is run here as written: its tools are listed with their
names, titles and hints, its ``ToolError`` reaches the agent once and leaves no dead letter, its timeout bounds
the call.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from mcp import Client
from mcp.types import CallToolResult, RequestParamsMeta

from mcp_hotmesh import ConfigError, InvalidInput, RetryPolicy, ToolContext, ToolError, ToolSet, load_toolset
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._mcp_server import IDEMPOTENCY_KEY, McpGateway
from tests.helpers import ROOT, Env, finished, hub_for, serving, text_of, wait_for

pytestmark = pytest.mark.anyio


def readme_toolset(tmp_path: Path) -> ToolSet:
    """The tool module the README shows (the python block that starts with ``# tools.py``), loaded as a user would."""
    readme = (ROOT / "README.md").read_text()
    [code] = re.findall(r"```python\n(# tools\.py\n.*?)```", readme, re.S)
    path = tmp_path / "tools.py"
    path.write_text(code)
    return load_toolset(f"{path}:toolset")


async def dead_rows(env: Env) -> int:
    return int(await env.admin.fetchval(f"""SELECT count(*) FROM "{env.schema}".messages WHERE state = 'dead'"""))


# ------------------------------------------------------------------------------------------ the README's tools
async def test_the_readme_tools_reach_an_agent_with_names_metadata_errors_and_timeout(
        env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcp_hotmesh._consumer")
    toolset = readme_toolset(tmp_path)
    async with hub_for(env, toolset=toolset) as hub, Client(hub.gateway.server) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert set(listed) == {"place_order", "list_products"}  # named after their functions
        order, products = listed["place_order"], listed["list_products"]
        assert order.title == "Place an order"
        assert order.annotations is not None and order.annotations.destructive_hint is False
        assert order.annotations.idempotent_hint is True and order.annotations.open_world_hint is True
        assert products.annotations is not None and products.annotations.read_only_hint is True
        streams = {r.name: (r.stream, r.timeout_ms) for r in hub.engine.tools()}
        assert streams == {"place_order": ("order.process", 120_000), "list_products": ("list_products", None)}

        done = await client.call_tool("place_order", {"sku": "kettle", "quantity": 2})
        assert not done.is_error, text_of(done)
        row = await env.admin.fetchrow(
            f"""SELECT id, extract(epoch FROM deadline - created_at) AS allowed FROM "{env.schema}".messages
                WHERE stream = 'order.process'""")
        assert row is not None
        assert done.structured_content == {"order_id": f"o-{row['id']}", "total": 19.0}
        assert 119 <= row["allowed"] <= 121  # the tool's own timeout, not the gateway's 20 s

        refused = await client.call_tool("place_order", {"sku": "toaster"})
        assert refused.is_error and "unknown SKU 'toaster'; the products are: kettle, teapot" in text_of(refused)
        last = await env.admin.fetchrow(
            f"""SELECT state, attempt, is_error FROM "{env.schema}".messages ORDER BY id DESC LIMIT 1""")
        assert last is not None
        assert (last["state"], last["attempt"], last["is_error"]) == ("done", 0, True)  # once, answered, not dead
        assert await dead_rows(env) == 0
        assert (await client.call_tool("list_products", {})).structured_content == {"kettle": 9.5, "teapot": 24.0}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "mcp_hotmesh._consumer"]
    assert any("refused message" in r.getMessage() for r in caplog.records)


def test_names_default_to_the_function_and_topics_to_the_name() -> None:
    tools = ToolSet()

    @tools.tool
    async def lookup(city: str) -> dict[str, str]:
        """Look a city up."""
        return {"city": city}

    @tools.tool(name="forecast")
    async def weather_forecast() -> dict[str, str]:
        """Tomorrow's weather."""
        return {}

    @tools.tool(topic="orders.v2")
    async def cancel_order() -> dict[str, str]:
        """Cancel an order."""
        return {}

    assert [(t.name, t.topic) for t in tools.tools] == [
        ("lookup", "lookup"), ("forecast", "forecast"), ("cancel_order", "orders.v2")]
    assert tools.tools[0].registration() == {  # no metadata given: none registered
        "name": "lookup", "description": "Look a city up.", "input_schema": tools.tools[0].input_schema,
        "output_schema": tools.tools[0].output_schema}
    for bad, says in (({"annotations": {"readOnly": True}}, "unknown hint 'readOnly'"),
                      ({"annotations": {"readOnlyHint": "yes"}}, "readOnlyHint must be true or false"),
                      ({"icons": [{"src": "file:///etc/passwd"}]}, "https: URL or a data:image/"),
                      ({"timeout": 0}, "timeout must be more than 0")):
        with pytest.raises(ConfigError, match=says):
            tools.tool(**bad)(cancel_order)


async def test_tool_invoke_runs_the_handler_without_a_queue(tmp_path: Path) -> None:
    tool = next(t for t in readme_toolset(tmp_path).tools if t.name == "place_order")
    assert await tool.invoke({"sku": "teapot"}, ToolContext(call_id="42")) == {"order_id": "o-42", "total": 24.0}
    with pytest.raises(ToolError, match="unknown SKU"):
        await tool.invoke({"sku": "toaster"}, ToolContext())


# --------------------------------------------------------------------------------------------- retries
class Transient(Exception):
    """Worth another try."""


async def test_retry_on_and_one_warning_line_per_failed_attempt(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_hotmesh._consumer")
    runs: list[tuple[str, int]] = []
    strict_runs: list[int] = []
    tools = ToolSet()
    quick = RetryPolicy(maximum_attempts=3, initial_interval=10, maximum_interval=20)

    @tools.tool(retry=quick, retry_on=(Transient,))
    async def shaky(ctx: ToolContext) -> dict[str, int]:
        """Fails twice, then works."""
        runs.append((ctx.call_id, ctx.attempt))
        if ctx.attempt < 2:
            raise Transient(f"upstream busy on attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}

    @tools.tool(retry=quick, retry_on=(Transient,))
    async def strict() -> dict[str, int]:
        """Fails with a bug: not worth retrying."""
        strict_runs.append(1)
        raise ValueError("a bug")

    async with hub_for(env, toolset=tools) as hub, Client(hub.gateway.server) as client:
        result = await client.call_tool("shaky", {})
        assert result.structured_content == {"attempt": 2}
        assert [a for _, a in runs] == [0, 1, 2] and len({c for c, _ in runs}) == 1  # one call id throughout
        failed = await client.call_tool("strict", {})
        assert failed.is_error and "a bug" in text_of(failed)
        assert strict_runs == [1] and await dead_rows(env) == 1  # dead-lettered at once, not retried
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "mcp_hotmesh._consumer"]
    assert len(warnings) == 3 and all(r.exc_info is None for r in warnings)  # one line each, no traceback
    retried = [("retrying in" in w.getMessage(), "Transient" in w.getMessage()) for w in warnings[:2]]
    assert retried == [(True, True)] * 2
    assert "not an exception its retry_on names" in warnings[2].getMessage()
    tracebacks = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info is not None]
    assert len(tracebacks) == 3


async def test_the_call_id_is_the_same_after_a_reclaim(env: Env) -> None:
    seen: list[tuple[str, int]] = []
    tools = ToolSet()

    @tools.tool
    async def reclaimed(ctx: ToolContext) -> dict[str, str]:
        """Notes its call id."""
        seen.append((ctx.call_id, ctx.attempt))
        return {"call_id": ctx.call_id}

    _, caller = await env.caller(["reclaimed"])
    _, thief = await env.worker(["reclaimed"])
    call_id = await caller.call("reclaimed", "", {}, 60_000)
    [held] = await thief.dequeue("reclaimed", "dies", 1, 50)  # claimed, then its worker "dies": the lease expires
    async with serving(env, tools):
        result = await finished(caller, call_id)
    assert result.result == {"call_id": str(held.id)} and seen == [(str(held.id), 0)]
    assert (await env.call_row(call_id))["reclaims"] == 1


# -------------------------------------------------------------------------------------------- idempotency
async def test_an_idempotency_key_runs_the_handler_once_per_caller_role(env: Env,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    charges: list[int] = []
    gate = anyio.Event()
    tools = ToolSet()

    @tools.tool
    async def charge(amount: int) -> dict[str, int]:
        """Charge the card."""
        charges.append(amount)
        await gate.wait()
        return {"charged": amount, "charge_number": len(charges)}

    def keyed(key: Any) -> RequestParamsMeta:
        return cast(RequestParamsMeta, {IDEMPOTENCY_KEY: key})

    async with hub_for(env, toolset=tools) as hub, Client(hub.gateway.server) as client:
        results: list[CallToolResult] = []
        sharing = anyio.Event()
        first_call = hub.engine._wait_for_first

        async def spied(*args: Any) -> Any:
            sharing.set()
            return await first_call(*args)

        monkeypatch.setattr(hub.engine, "_wait_for_first", spied)

        async def call() -> None:
            results.append(await client.call_tool("charge", {"amount": 5}, meta=keyed("order-1")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)

            async def running() -> bool:
                return len(charges) == 1

            await wait_for(running)
            tg.start_soon(call)  # the same key while the first runs: it waits for the first
            with anyio.fail_after(10):
                await sharing.wait()
            gate.set()
        assert charges == [5]
        assert [r.structured_content for r in results] == [{"charged": 5, "charge_number": 1}] * 2
        again = await client.call_tool("charge", {"amount": 5}, meta=keyed("order-1"))  # long after: its answer
        assert again.structured_content == {"charged": 5, "charge_number": 1} and charges == [5]
        other = await client.call_tool("charge", {"amount": 7}, meta=keyed("order-1"))
        assert other.is_error and "already used for another call" in text_of(other) and charges == [5]
        bad = await client.call_tool("charge", {"amount": 5}, meta=keyed(17))
        assert bad.is_error and "idempotency key must be a string" in text_of(bad)
        assert (await client.call_tool("charge", {"amount": 5}, meta=keyed("order-2"))).structured_content == {
            "charged": 5, "charge_number": 2}

        # another caller role's key is its own: the same key runs again
        role = await env.provision(["charge"], "caller")
        engine = Engine(await env.pool(role), schema=env.schema, role=role.role, listen_dsn=env.dsn(role), timeout=20)
        async with engine, Client(McpGateway(engine).server) as stranger:
            theirs = await stranger.call_tool("charge", {"amount": 5}, meta=keyed("order-1"))
            assert theirs.structured_content == {"charged": 5, "charge_number": 3}
    keys = await env.admin.fetch(f'SELECT owner, idempotency_key FROM "{env.schema}".messages ORDER BY id')
    assert [k["idempotency_key"] for k in keys] == ["order-1", "order-2", "order-1"]


# ------------------------------------------------------------------------------------ metadata and timeouts
async def test_hostile_metadata_is_refused_at_registration_and_a_bad_row_costs_only_itself(env: Env) -> None:
    _, worker = await env.worker(["meta"])
    base = {"name": "meta_tool", "description": "d", "input_schema": {"type": "object"}}
    for extra, says in (({"title": "t" * 300}, "title"),
                        ({"annotations": {"readOnlyHint": "yes"}}, "annotations"),
                        ({"annotations": {"dangerous": True}}, "annotations"),
                        ({"icons": [{"src": "file:///etc/passwd"}]}, "icons"),
                        ({"icons": [{"src": "https://x.example/i.png"}] * 9}, "icons"),
                        ({"meta": ["not", "an", "object"]}, "meta"),
                        ({"timeout_ms": 10**12}, "timeout_ms"),
                        ({"timeout_ms": 1.5}, "timeout_ms")):
        with pytest.raises(InvalidInput, match=says):
            await worker.register_definition("meta", "", {**base, **extra})
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".tools') == 0

    tools = ToolSet()

    @tools.tool(title="Echo", annotations={"readOnlyHint": True})
    async def echo_meta(text: str) -> dict[str, str]:
        """Echo."""
        return {"text": text}

    async with hub_for(env, toolset=tools) as hub, Client(hub.gateway.server) as client:
        # a row that got past the checks (written by hand): listed without its metadata, the list still answers
        await env.admin.execute(
            f"""UPDATE "{env.schema}".tools SET annotations = '{{"readOnlyHint": "maybe"}}', description = 'Echo!'""")
        await hub.engine.refresh()
        [tool] = (await client.list_tools()).tools
        assert tool.name == "echo_meta" and tool.description == "Echo!" and tool.annotations is None
        assert (await client.call_tool("echo_meta", {"text": "hi"})).structured_content == {"text": "hi"}


async def test_a_tools_timeout_is_capped_by_the_admin(env: Env) -> None:
    tools = ToolSet()

    @tools.tool(timeout=120)
    async def slow_one() -> dict[str, str]:
        """Takes its time."""
        await anyio.sleep(300)
        return {}

    await env.set("max_tool_timeout_ms", 1000)
    async with hub_for(env, toolset=tools) as hub, Client(hub.gateway.server) as client:
        assert [r.timeout_ms for r in hub.engine.tools()] == [1000]
        result = await client.call_tool("slow_one", {})
        assert result.is_error and "did not finish within 1 seconds" in text_of(result)
