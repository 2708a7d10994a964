"""MCP Tasks through raw JSON-RPC over Streamable HTTP (the SDK's client has no Tasks support), in both dialects:
the task-augmented ``tools/call`` of 2025-11-25 and the ``io.modelcontextprotocol/tasks`` extension of
2026-07-28. A task is its call: it exists before its id is handed out, any gateway of the same caller role
answers for it (the one that made it may be SIGKILLed), and no other role can read, wait for or cancel it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO
from uuid import UUID

import anyio
import httpx2
import pytest

from mcp_hotmesh import _admin as admin
from mcp_hotmesh._tools import ToolSet

from .helpers import (
    LEGACY,
    MODERN,
    ROOT,
    TOKEN,
    Env,
    Raw,
    RpcError,
    clean_environ,
    cli_command,
    free_port,
    http_client,
    http_gateway,
    run_worker,
    wait_for,
)

pytestmark = pytest.mark.anyio

TOOLS = ToolSet()


@TOOLS.tool(topic="tasks.hold", name="hold")
async def hold(seconds: float) -> dict[str, float]:
    """Sleeps for the given seconds, then says how long it slept."""
    await anyio.sleep(seconds)
    return {"slept": seconds}

@contextlib.asynccontextmanager
async def served(env: Env) -> AsyncIterator[tuple[Any, str]]:
    """A worker for ``TOOLS`` and a gateway as a fresh caller role; yields the role and the gateway's URL."""
    worker = await env.provision(list(TOOLS.topics), "worker")
    caller = await env.provision(list(TOOLS.topics), "caller")
    async with run_worker(env, worker, TOOLS), http_gateway(env, caller, TOOLS) as url:
        yield caller, url


async def _state(env: Env, task_id: str) -> str | None:
    value = await env.admin.fetchval(f'SELECT state FROM "{env.schema}".messages WHERE call_id = $1',
                                     UUID(task_id))
    return None if value is None else str(value)


async def poll(raw: Raw, task_id: str, until: set[str], seconds: float = 20) -> dict[str, Any]:
    with anyio.fail_after(seconds):
        while True:
            task = await raw.request("tasks/get", {"taskId": task_id})
            if task["status"] in until:
                return task
            await anyio.sleep(0.1)


async def test_task_augmented_call_2025(env: Env) -> None:
    async with served(env) as (_, url), http_client(TOKEN) as http:
        raw = Raw(http, url, LEGACY)
        init = await raw.open()
        assert init["capabilities"]["tasks"] == {"cancel": {}, "requests": {"tools": {"call": {}}}}
        tools = {t["name"]: t for t in (await raw.request("tools/list", {}))["tools"]}
        assert tools["hold"]["execution"] == {"taskSupport": "optional"}

        created = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 1.5},
                                                   "task": {"ttl": 60_000}})
        task = created["task"]
        assert task["status"] == "working" and task["pollInterval"] > 0
        assert task["ttl"] == 30_000  # the call's time limit
        assert await _state(env, task["taskId"]) in ("ready", "reserved")  # the task is the call, committed
        got = await raw.request("tasks/get", {"taskId": task["taskId"]})
        assert got["status"] == "working" and got["taskId"] == task["taskId"]
        result = await raw.request("tasks/result", {"taskId": task["taskId"]})  # waits for the end
        assert result["structuredContent"] == {"slept": 1.5} and not result.get("isError")
        assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task["taskId"]}
        done = await raw.request("tasks/get", {"taskId": task["taskId"]})
        assert done["status"] == "completed"
        with pytest.raises(RpcError) as ended:
            await raw.request("tasks/cancel", {"taskId": task["taskId"]})
        assert ended.value.code == -32602

        # cancelling a running task: cancelled at once, and no failure
        created = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 30}, "task": {}})
        task_id = created["task"]["taskId"]
        await wait_for(lambda: _is(env, task_id, "reserved"))
        cancelled = await raw.request("tasks/cancel", {"taskId": task_id})
        assert cancelled["status"] == "cancelled"
        assert (await raw.request("tasks/get", {"taskId": task_id}))["status"] == "cancelled"
        assert await _state(env, task_id) == "cancelled"
        assert await admin.dlq_list(env.admin, env.schema, admin.DlqFilter()) == []

        # without a task: a plain call, as ever
        plain = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 0.1}})
        assert plain["structuredContent"] == {"slept": 0.1}
        for bad in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
            with pytest.raises(RpcError) as unknown:
                await raw.request("tasks/get", {"taskId": bad})
            assert unknown.value.code == -32602


async def _is(env: Env, task_id: str, state: str) -> bool:
    return await _state(env, task_id) == state


async def test_tasks_extension_2026(env: Env) -> None:
    async with served(env) as (_, url), http_client(TOKEN) as http:
        raw = Raw(http, url, MODERN)
        discovered = await raw.open()
        assert "io.modelcontextprotocol/tasks" in discovered["capabilities"]["extensions"]

        quick = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 0.05}})
        assert quick.get("resultType", "complete") == "complete" and quick["structuredContent"] == {"slept": 0.05}

        created = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 2.5}})
        assert created["resultType"] == "task" and created["status"] == "working"
        assert created["ttlMs"] == 30_000 and created["pollIntervalMs"] > 0
        done = await poll(raw, created["taskId"], {"completed", "failed", "cancelled"})
        assert done["status"] == "completed" and done["resultType"] == "complete"
        assert done["result"]["structuredContent"] == {"slept": 2.5}

        # a client that did not declare the extension never gets a task
        plain = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 1.5}}, tasks=False)
        assert plain["structuredContent"] == {"slept": 1.5}

        running = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 30}})
        assert running["resultType"] == "task"
        assert (await raw.request("tasks/cancel", {"taskId": running["taskId"]})).get("resultType") == "complete"
        assert (await poll(raw, running["taskId"], {"cancelled"}))["status"] == "cancelled"
        assert await raw.request("tasks/update", {"taskId": running["taskId"], "inputResponses": {}}) is not None
        assert await admin.dlq_list(env.admin, env.schema, admin.DlqFilter()) == []


async def test_another_caller_role_cannot_see_or_cancel_a_task(env: Env) -> None:
    worker = await env.provision(list(TOOLS.topics), "worker")
    owner = await env.provision(list(TOOLS.topics), "caller")
    stranger = await env.provision(list(TOOLS.topics), "caller")  # the same streams, another identity
    async with run_worker(env, worker, TOOLS), http_gateway(env, owner, TOOLS) as mine, \
            http_gateway(env, stranger, TOOLS) as theirs, \
            http_client(TOKEN) as http:
        victim = Raw(http, mine, LEGACY)
        await victim.open()
        task_id = (await victim.request("tools/call", {"name": "hold", "arguments": {"seconds": 2},
                                                       "task": {}}))["task"]["taskId"]
        for version in (LEGACY, MODERN):
            attacker = Raw(http, theirs, version)
            await attacker.open()
            for method in ("tasks/get", "tasks/result", "tasks/cancel"):
                with pytest.raises(RpcError) as refused:
                    await attacker.request(method, {"taskId": task_id})
                assert refused.value.code == -32602 and "No such task" in str(refused.value), method
        # the victim's task ran on, untouched
        result = await victim.request("tasks/result", {"taskId": task_id})
        assert result["structuredContent"] == {"slept": 2}
        assert await _state(env, task_id) == "done"


def _log_file(tmp_path: Path) -> BinaryIO:
    """Where the gateway processes write their logs (read them when the test fails)."""
    return (tmp_path / "gateways.log").open("wb")


def _serve(env: Env, caller: Any, port: int, log: BinaryIO) -> subprocess.Popen[bytes]:
    """``mcp-hotmesh serve --transport http`` logged in as ``caller`` (workers run elsewhere)."""
    return subprocess.Popen(
        [*cli_command(), "serve", "--transport", "http", "--dsn", env.dsn(caller), "--schema", env.schema,
         "--port", str(port), "--token", TOKEN, "--no-worker"],
        cwd=ROOT, env=clean_environ(), stdout=log, stderr=log)


async def _up(http: httpx2.AsyncClient, url: str) -> None:
    async def healthy() -> bool:
        try:
            return (await http.get(f"{url}/healthz")).status_code == 200
        except httpx2.HTTPError:
            return False

    await wait_for(healthy, 60)


@pytest.mark.slow
async def test_a_task_outlives_its_gateway_process(env: Env, tmp_path: Path) -> None:
    worker = await env.provision(list(TOOLS.topics), "worker")
    caller = await env.provision(list(TOOLS.topics), "caller")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _log_file(tmp_path) as log:
        async with run_worker(env, worker, TOOLS), http_client(TOKEN) as http:
            first = _serve(env, caller, port, log)
            try:
                await _up(http, url)
                raw = Raw(http, url, LEGACY)
                await raw.open()
                created = await raw.request("tools/call", {"name": "hold", "arguments": {"seconds": 3}, "task": {}})
                task_id = created["task"]["taskId"]
            finally:
                os.kill(first.pid, signal.SIGKILL)  # no goodbye: the task is left to the database
                first.wait()
            assert await _state(env, task_id) in ("ready", "reserved")
            second = _serve(env, caller, port, log)
            try:
                await _up(http, url)
                for version in (MODERN, LEGACY):
                    again = Raw(http, url, version)
                    await again.open()
                    done = await poll(again, task_id, {"completed", "failed", "cancelled"})
                    assert done["status"] == "completed", done
                result = await again.request("tasks/result", {"taskId": task_id})
                assert result["structuredContent"] == {"slept": 3}
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(30)
