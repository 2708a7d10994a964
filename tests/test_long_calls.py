"""Long calls through a real MCP client over Streamable HTTP: keep-alive progress while a call is queued or its
handler is silent (only for a client that sent a progress token, always increasing, merged with the handler's
own progress), and calls stopped by their caller or by their time limit ending as such, not as failures: nothing
in the dead-letter queue, in ``status`` or in the ``/metrics`` alert counters."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT

from mcp_hotmesh import _admin as admin
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._tools import ToolContext, ToolSet

from .helpers import TOKEN, Env, http_client, http_server, one_line_error, run_cli, run_worker, text_of, wait_for

pytestmark = pytest.mark.anyio

TOOLS = ToolSet()
KEEPALIVE = 0.3


@TOOLS.tool(topic="long.hold", name="hold")
async def hold(seconds: float) -> dict[str, float]:
    """Sleeps for the given seconds without a word, then says how long it slept."""
    await anyio.sleep(seconds)
    return {"slept": seconds}


@TOOLS.tool(topic="long.steps", name="steps")
async def steps(n: int, pause: float, ctx: ToolContext) -> dict[str, int]:
    """Reports progress 1..n of n, pausing between steps."""
    for i in range(1, n + 1):
        await anyio.sleep(pause)
        await ctx.report_progress(i, n, f"step {i} of {n}")
    await anyio.sleep(pause)
    return {"steps": n}


@dataclass
class LongHub:
    env: Env
    engine: Engine
    gateway: McpGateway
    url: str


@contextlib.asynccontextmanager
async def long_hub(env: Env, *, call_limit: float = 30.0) -> AsyncIterator[LongHub]:
    """A worker that runs one call at a time, and a gateway sending keep-alives every ``KEEPALIVE`` s, on HTTP."""
    worker = await env.provision(list(TOOLS.topics), "worker")
    caller = await env.provision(list(TOOLS.topics), "caller")
    engine = Engine(await env.pool(caller), schema=env.schema, role=caller.role, listen_dsn=env.dsn(caller),
                    timeout=call_limit)
    async with run_worker(env, worker, TOOLS, concurrency=1), engine:

        async def ready() -> bool:
            await engine.refresh()
            return all(r.live_workers for r in engine.tools()) and len(engine.tools()) == len(TOOLS.tools)

        await wait_for(ready, 30)
        gateway = McpGateway(engine, keepalive=KEEPALIVE)
        async with http_server(gateway) as url:
            yield LongHub(env, engine, gateway, url)


@contextlib.asynccontextmanager
async def client_of(hub: LongHub) -> AsyncIterator[Client]:
    async with http_client(TOKEN) as http, Client(streamable_http_client(f"{hub.url}/mcp", http_client=http),
                                                  read_timeout_seconds=60) as client:
        yield client


Seen = list[tuple[float, float | None, str | None]]


def recorder(seen: Seen) -> ProgressFnT:
    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    return on_progress


def increasing(seen: Seen) -> bool:
    values = [p for p, _, _ in seen]
    return all(b > a for a, b in itertools.pairwise(values))


async def test_keepalives_while_queued_and_while_silent_only_with_a_token(env: Env) -> None:
    async with long_hub(env) as hub, client_of(hub) as client:
        first: Seen = []
        second: Seen = []
        third: Seen = []
        async with anyio.create_task_group() as tg:
            # The worker runs one call at a time: the first runs silently, the second waits behind it, the third
            # behind both; each client asked for progress.
            tg.start_soon(lambda: client.call_tool("hold", {"seconds": 2.5}, progress_callback=recorder(first)))
            await wait_for(lambda: _state_count(hub, "reserved", 1))
            tg.start_soon(lambda: client.call_tool("hold", {"seconds": 0.1}, progress_callback=recorder(second)))
            await wait_for(lambda: _state_count(hub, "ready", 1))
            tg.start_soon(lambda: client.call_tool("hold", {"seconds": 0.1}, progress_callback=recorder(third)))
            await wait_for(lambda: _state_count(hub, "ready", 2))
            silent = await client.call_tool("hold", {"seconds": 0.1})  # no token: no keep-alive, whatever waits
            assert not silent.is_error
        running = [m for _, _, m in first if m and m.startswith("running for ")]
        assert len(running) >= 2, first  # the silent handler: "running for N s", again and again
        assert any(m == "queued, next in line" for _, _, m in second), second
        assert any(m == "queued, 1 ahead of it" for _, _, m in third), third
        for seen in (first, second, third):
            assert increasing(seen), seen


async def test_no_keepalive_without_a_progress_token(env: Env) -> None:
    async with long_hub(env) as hub, client_of(hub) as client:
        heard: list[object] = []

        async def on_message(message: object) -> None:
            heard.append(message)

        async with http_client(TOKEN) as http, Client(streamable_http_client(f"{hub.url}/mcp", http_client=http),
                                                      message_handler=on_message, mode="legacy") as plain:
            result = await plain.call_tool("hold", {"seconds": KEEPALIVE * 5})
        assert result.structured_content == {"slept": KEEPALIVE * 5}
        assert not [m for m in heard if "Progress" in type(m).__name__], heard
        # and the same call with a token hears keep-alives: the interval was long enough for them
        seen: Seen = []
        await client.call_tool("hold", {"seconds": KEEPALIVE * 5}, progress_callback=recorder(seen))
        assert seen


async def test_keepalives_merge_with_the_handlers_progress(env: Env) -> None:
    async with long_hub(env) as hub, client_of(hub) as client:
        seen: Seen = []
        result = await client.call_tool("steps", {"n": 3, "pause": KEEPALIVE * 4}, progress_callback=recorder(seen))
        assert result.structured_content == {"steps": 3}
        assert increasing(seen), seen
        handler = [(p, t, m) for p, t, m in seen if m and m.startswith("step ") and "(running for " not in m]
        assert [m for _, _, m in handler] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"], seen
        assert all(t == 3 for _, t, _ in handler)
        # between the handler's reports, keep-alives: its last words and how long it has run, just above its value
        between = [(p, m) for p, _, m in seen if m and "(running for " in m]
        assert between and all(m.startswith("step ") for _, m in between), seen
        assert handler[0][0] == 1  # the handler's own value went through as it gave it


async def _state_count(hub: LongHub, state: str, n: int) -> bool:
    count = await hub.env.admin.fetchval(f'SELECT count(*) FROM "{hub.env.schema}".messages WHERE state = $1',
                                         state)
    return bool(count >= n)


async def _nothing_failed(hub: LongHub) -> None:
    """Nothing in the dead-letter queue, no dead calls in status, no alert in /metrics."""
    assert await admin.dlq_list(hub.env.admin, hub.env.schema, admin.DlqFilter()) == []
    status = await admin.status(hub.env.admin, hub.env.schema)
    assert all(s.dead == 0 for s in status.streams), status
    metrics = await hub.gateway.metrics_text()
    assert 'outcome="error"' not in metrics, metrics
    assert [line for line in metrics.splitlines()
            if line.startswith("hotmesh_dead_letters{") and not line.endswith(" 0")] == [], metrics


async def test_stop_and_timeout_leave_nothing_in_the_dead_letter_queue(env: Env) -> None:
    async with long_hub(env, call_limit=1.0) as hub, client_of(hub) as client:
        # Stop: the client gives up on a running call
        with anyio.move_on_after(1.0):
            await client.call_tool("hold", {"seconds": 30})
        await wait_for(lambda: _state_count(hub, "cancelled", 1), 10)
        # the time limit: the gateway gives up on a call after 1 s
        result = await client.call_tool("hold", {"seconds": 30})
        assert result.is_error and "did not finish within 1 seconds" in text_of(result)
        await wait_for(lambda: _state_count(hub, "expired", 1), 10)
        # a queued call stopped before it ran
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.call_tool("hold", {"seconds": 0.8}))
            await wait_for(lambda: _state_count(hub, "reserved", 1))
            with anyio.move_on_after(0.3):
                await client.call_tool("hold", {"seconds": 0.1})
        await wait_for(lambda: _state_count(hub, "cancelled", 2), 10)
        await _nothing_failed(hub)
        unfinished = await hub.env.admin.fetchval(
            f"SELECT count(*) FROM \"{env.schema}\".messages WHERE state IN ('ready', 'reserved')")
        assert unfinished == 0
        # the worker stopped each handler and was quiet about it: it still serves
        after = await client.call_tool("hold", {"seconds": 0.1})
        assert after.structured_content == {"slept": 0.1}
        assert 'outcome="timeout"' in await hub.gateway.metrics_text()


async def test_a_keepalive_interval_that_is_no_positive_number_is_a_one_line_error(tmp_path: Path) -> None:
    for bad in ("0", "-5", "nan"):
        done = await run_cli("serve", "--keepalive", bad, "--data-dir", str(tmp_path / "never-made"))
        assert "--keepalive must be a positive number of seconds" in one_line_error(done, "serve", 2)
    assert not (tmp_path / "never-made").exists()  # refused before anything started
