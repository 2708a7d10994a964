"""Resumable Streamable HTTP, by hand over HTTP (the SDK's client does not reconnect mid-call): a POST's SSE stream
starts with a priming event and a retry field; a client that drops the connection mid-call and reconnects with
``Last-Event-ID`` gets the call's answer, from the same gateway or from another one logged in as the same caller
role; another role, or no token, gets nothing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import anyio
import httpx2
import pytest

from mcp_hotmesh._roles import ProvisionedRole
from mcp_hotmesh._tools import ToolSet

from .helpers import TOKEN, Env, http_client, http_gateway, run_worker

pytestmark = pytest.mark.anyio

TOOLS = ToolSet()


@TOOLS.tool(topic="resume.hold", name="hold")
async def hold(seconds: float) -> dict[str, float]:
    """Sleeps for the given seconds, then says how long it slept."""
    await anyio.sleep(seconds)
    return {"slept": seconds}


@contextlib.asynccontextmanager
async def gateway_for(env: Env, caller: ProvisionedRole) -> AsyncIterator[str]:
    """A gateway of ``caller`` on HTTP; yields its MCP endpoint."""
    async with http_gateway(env, caller, TOOLS) as url:
        yield f"{url}/mcp"


async def initialize(http: httpx2.AsyncClient, url: str, version: str = "2025-11-25") -> str:
    """A session of ``version``; its id."""
    response = await http.post(url, headers={"Accept": "application/json, text/event-stream"}, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
    session = response.headers["mcp-session-id"]
    await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                    headers={"Accept": "application/json, text/event-stream", "Mcp-Session-Id": session,
                             "MCP-Protocol-Version": "2025-11-25"})
    return session


def events(lines: list[str]) -> list[dict[str, str]]:
    """SSE lines as events: their fields (``data`` joined), comments left out."""
    found: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines:
        if not line:
            if current:
                found.append(current)
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value[1:] if value.startswith(" ") else value
    return found


async def call_and_drop(http: httpx2.AsyncClient, url: str, session: str, seconds: float) -> list[dict[str, str]]:
    """POST a call to ``hold`` and read its stream until the call's event; then drop the connection."""
    lines: list[str] = []
    headers = {"Accept": "application/json, text/event-stream", "Mcp-Session-Id": session,
               "MCP-Protocol-Version": "2025-11-25"}
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "hold",
                                                                          "arguments": {"seconds": seconds}}}
    with anyio.fail_after(10):
        async with http.stream("POST", url, json=body, headers=headers) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                lines.append(line)
                if line == "" and any(":" in e.get("id", "") for e in events(lines)):
                    break  # the call is queued: hang up mid-call
    return events(lines)


async def resume(http: httpx2.AsyncClient, url: str, last: str, session: str | None = None) -> dict[str, Any]:
    headers = {"Accept": "text/event-stream", "Last-Event-ID": last, "MCP-Protocol-Version": "2025-11-25"}
    if session:
        headers["Mcp-Session-Id"] = session
    lines: list[str] = []
    with anyio.fail_after(20):
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, response.status_code
            async for line in response.aiter_lines():
                lines.append(line)
    found = events(lines)
    assert found[0]["id"] == last and found[0]["data"] == "" and "retry" in found[0]
    answers = [json.loads(e["data"]) for e in found if e.get("data")]
    assert len(answers) == 1
    answer: dict[str, Any] = answers[0]
    return answer


async def test_reconnecting_with_last_event_id_gets_the_result(env: Env) -> None:
    worker = await env.provision(list(TOOLS.topics), "worker")
    caller = await env.provision(list(TOOLS.topics), "caller")
    stranger = await env.provision(list(TOOLS.topics), "caller")
    async with run_worker(env, worker, TOOLS), gateway_for(env, caller) as first, \
            gateway_for(env, caller) as second, gateway_for(env, stranger) as theirs, http_client(TOKEN) as http:
        session = await initialize(http, first)
        stream = await call_and_drop(http, first, session, 2.0)
        priming, queued = stream[0], stream[-1]
        assert priming["data"] == "" and priming["id"] and int(priming["retry"]) > 0  # first, with a retry field
        call_id = UUID(queued["id"].partition(":")[0])

        async def state() -> str:
            return str(await env.admin.fetchval(f'SELECT state FROM "{env.schema}".messages WHERE call_id = $1',
                                                call_id))

        assert await state() in ("ready", "reserved")  # hanging up did not stop the call
        # the same gateway, with the session
        answer = await resume(http, first, queued["id"], session)
        assert answer["id"] == 7 and answer["result"]["structuredContent"] == {"slept": 2.0}

        # another gateway of the same role, mid-call, knowing nothing of the session
        stream = await call_and_drop(http, first, session, 2.0)
        answer = await resume(http, second, stream[-1]["id"])
        assert answer["id"] == 7 and answer["result"]["structuredContent"] == {"slept": 2.0}

        # another role, or no token: nothing
        stream = await call_and_drop(http, first, session, 1.0)
        refused = await http.get(theirs, headers={"Accept": "text/event-stream", "Last-Event-ID": stream[-1]["id"]})
        assert refused.status_code == 404
        async with http_client(None) as anonymous:
            no_token = await anonymous.get(second, headers={"Accept": "text/event-stream",
                                                            "Last-Event-ID": stream[-1]["id"]})
        assert no_token.status_code == 401
        answer = await resume(http, first, stream[-1]["id"], session)  # the victim's call is untouched
        assert answer["result"]["structuredContent"] == {"slept": 1.0}


async def test_a_call_answered_on_its_stream_is_primed_for_clients_that_read_it(env: Env) -> None:
    worker = await env.provision(list(TOOLS.topics), "worker")
    caller = await env.provision(list(TOOLS.topics), "caller")
    async with run_worker(env, worker, TOOLS), gateway_for(env, caller) as url, http_client(TOKEN) as http:
        session = await initialize(http, url)
        response = await http.post(url, headers={"Accept": "application/json, text/event-stream",
                                                 "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-03-26"},
                                   json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                         "params": {"name": "hold", "arguments": {"seconds": 0.1}}})
        found = events(response.text.splitlines())
        assert found[0]["data"] == "" and "retry" in found[0] and found[0]["id"]  # the priming event comes first
        answer = json.loads(found[-1]["data"])
        assert answer["id"] == 1 and answer["result"]["structuredContent"] == {"slept": 0.1}

        # a client of an earlier version may not read an event with no data: it gets none
        older = await initialize(http, url, "2025-06-18")
        response = await http.post(url, headers={"Accept": "application/json, text/event-stream",
                                                 "Mcp-Session-Id": older, "MCP-Protocol-Version": "2025-06-18"},
                                   json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                         "params": {"name": "hold", "arguments": {"seconds": 0.1}}})
        found = events(response.text.splitlines())
        assert all(e.get("data") for e in found), found
        assert json.loads(found[-1]["data"])["result"]["structuredContent"] == {"slept": 0.1}
