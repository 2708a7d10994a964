"""The gateway over its real transports: ``mcp-hotmesh serve`` as a stdio subprocess launched from the example
host config, a worker in another process, and Streamable HTTP with bearer tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from mcp_hotmesh._http import check_http_token
from mcp_hotmesh._tools import load_toolset
from mcp_hotmesh.errors import ConfigError
from mcp_hotmesh.examples import toolset as example_tools
from tests.helpers import ROOT, TOKEN, Env, Hub, clean_environ, cli_command, http_client, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # subprocesses: serve and worker over stdio, and HTTP

HOST_CONFIG = ROOT / "examples/agents/claude_desktop_config.json"
AGENT_TOOLS = "examples/agents/tools.py:toolset"


def host_entry(env: dict[str, str]) -> StdioServerParameters:
    """The example config's entry, launched as a host would, with the placeholder path made real."""
    entry = json.loads(HOST_CONFIG.read_text())["mcpServers"]["hotmesh"]
    assert entry["command"].startswith("/ABSOLUTE/PATH/TO/") and entry["command"].endswith("/bin/mcp-hotmesh")
    command, *prefix = cli_command()
    return StdioServerParameters(command=command, args=[*prefix, *entry["args"]], env={**entry["env"], **env},
                                 cwd=str(ROOT))


# ------------------------------------------------------------------------------------------------ stdio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_serve_over_stdio_from_the_host_config(env: Env, mode: str) -> None:
    params = host_entry({"HOTMESH_DSN": env.server.admin_dsn, "HOTMESH_SCHEMA": env.schema})
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with Client(params, mode=mode, read_timeout_seconds=60) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        names = sorted(t.name for t in (await client.list_tools()).tools)
        assert names == sorted(t.name for t in example_tools.tools)
        echoed = await client.call_tool("echo", {"text": "over stdio"})
        assert echoed.structured_content == {"text": "over stdio", "length": 10}
        slept = await client.call_tool("sleep", {"seconds": 0.6, "steps": 3}, progress_callback=on_progress)
        assert not slept.is_error and seen
        bad = await client.call_tool("math_add", {"a": "one", "b": 2})
        assert bad.is_error
    # serve logged in as its own roles, with passwords: the caller and the attached worker
    roles = {r["rolname"] for r in await env.admin.fetch(
        "SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"{env.schema}\\_%\\_gateway")}
    assert roles == {f"{env.schema}_c_gateway", f"{env.schema}_w_gateway"}


async def test_stdout_carries_only_protocol_with_the_embedded_server(tmp_path: Path) -> None:
    """Raw JSON-RPC in, every stdout line must be JSON-RPC out; the embedded server starts and stops quietly."""
    os.chmod(tmp_path, 0o755)  # the embedded server's OS user must reach its data directory
    env = clean_environ(HOTMESH_DATA_DIR=str(tmp_path / "pg"))
    env.pop("PYTHONUNBUFFERED", None)  # a user's host does not set it: the child's stdout is block-buffered
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "claude-ai", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "sleep", "arguments": {"seconds": 0.4, "steps": 2}, "_meta": {"progressToken": "t"}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}},
    ]
    stray = tmp_path / "noisy_tools.py"  # a tool module that prints: it must not reach the protocol
    stray.write_text("print('stray output')\nfrom mcp_hotmesh.examples import toolset\n")
    lines: list[dict[str, Any]] = []
    async with await anyio.open_process([*cli_command(), "serve", "--tools", f"{stray}:toolset"], env=env,
                                        cwd=str(ROOT)) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        await proc.stdin.send("".join(json.dumps(r) + "\n" for r in requests).encode())
        buffer = b""
        with anyio.fail_after(60):
            while not {3, 4} <= {m.get("id") for m in lines}:
                try:
                    buffer += await proc.stdout.receive()
                except anyio.EndOfStream:  # it stopped before answering: say why
                    pytest.fail(b"".join([chunk async for chunk in proc.stderr]).decode(errors="replace"))
                *complete, buffer = buffer.split(b"\n")
                lines += [json.loads(line) for line in complete]  # a stray non-JSON line fails here
        await proc.stdin.aclose()
        with anyio.fail_after(30):
            rest = b"".join([chunk async for chunk in proc.stdout])
            stderr = b"".join([chunk async for chunk in proc.stderr]).decode()
            assert await proc.wait() == 0
    lines += [json.loads(line) for line in (buffer + rest).splitlines() if line.strip()]
    assert all(m.get("jsonrpc") == "2.0" for m in lines)
    by_id = {m["id"]: m for m in lines if "id" in m}
    assert by_id[1]["result"]["capabilities"]["tools"]["listChanged"] is True
    assert {t["name"] for t in by_id[2]["result"]["tools"]} == {t.name for t in example_tools.tools}
    assert by_id[3]["result"]["structuredContent"] == {"seconds": 0.4, "steps": 2}
    assert by_id[4]["result"]["structuredContent"] == {"text": "hi", "length": 2}
    assert any(m.get("method") == "notifications/progress" for m in lines)
    assert "embedded PostgreSQL started" in stderr and "stray output" in stderr  # logs and strays: stderr
    assert not (tmp_path / "pg" / "postmaster.pid").exists()  # the server it started is stopped


async def test_worker_in_another_process_and_a_caller_only_gateway(env: Env) -> None:
    """``mcp-hotmesh worker`` with a worker role's password over TCP; ``serve`` with only a caller role's DSN."""
    streams = list(load_toolset(f"{ROOT}/{AGENT_TOOLS}").topics)
    worker_role = await env.provision(streams, "worker")
    caller_role = await env.provision(streams, "caller")
    worker_env = clean_environ(HOTMESH_WORKER_USER=worker_role.role, HOTMESH_WORKER_PASSWORD=worker_role.password)
    worker = await anyio.open_process(
        [*cli_command(), "worker", "--dsn", env.server.base_dsn, "--schema", env.schema, "--tools", AGENT_TOOLS],
        env=worker_env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        async def worker_alive() -> bool:
            assert worker.returncode is None, "the worker exited"
            return bool(await env.admin.fetchval(
                f'SELECT count(DISTINCT stream) = $1 FROM "{env.schema}".workers WHERE role_name = $2',
                len(streams), worker_role.role))

        await wait_for(worker_alive, 30)
        command, *prefix = cli_command()
        params = StdioServerParameters(command=command, args=[*prefix, "serve"], cwd=str(ROOT),
                                       env={"HOTMESH_DSN": env.dsn(caller_role), "HOTMESH_SCHEMA": env.schema})
        async with Client(params, read_timeout_seconds=60) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "word_count" in names
            counted = await client.call_tool("word_count", {"text": "a b a", "top": 1})
            assert counted.structured_content == {"words": 3, "lines": 1, "top": ["a"]}
        # the caller-only gateway made no roles of its own
        assert not await env.admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1",
                                            f"{env.schema}\\_%\\_gateway%")
    finally:
        worker.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            assert await worker.wait() == 0  # a graceful stop
        await worker.aclose()


# ------------------------------------------------------------------------------------------------- HTTP
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_http_with_the_token(http_hub: tuple[Hub, str], mode: str) -> None:
    _, url = http_hub
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with http_client(TOKEN) as http, Client(streamable_http_client(f"{url}/mcp", http_client=http),
                                                  mode=mode) as client:
        assert "echo" in {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("echo", {"text": "over http"})
        assert result.structured_content == {"text": "over http", "length": 9}
        slept = await client.call_tool("sleep", {"seconds": 0.6, "steps": 3}, progress_callback=on_progress)
        assert not slept.is_error and seen


async def test_http_refuses_a_wrong_token_or_none(http_hub: tuple[Hub, str]) -> None:
    _, url = http_hub
    with pytest.raises(Exception):  # noqa: B017 - 2.3.0 raises an ExceptionGroup wrapping MCPError
        async with http_client("wrong-token-but-long-enough") as http, Client(
            streamable_http_client(f"{url}/mcp", http_client=http)
        ) as client:
            await client.list_tools()
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with http_client(None) as http:
        none = await http.post(f"{url}/mcp", json=body)
        assert none.status_code == 401 and none.headers["www-authenticate"].startswith("Bearer")
    async with http_client("wrong-token-but-long-enough") as http:
        assert (await http.post(f"{url}/mcp", json=body)).status_code == 401
    async with http_client(TOKEN) as http:  # DNS rebinding: a foreign Host is refused even with the token
        rebound = await http.post(f"{url}/mcp", json=body, headers={"Host": "evil.example:80"})
        assert rebound.status_code == 421


async def test_healthz_needs_no_token(http_hub: tuple[Hub, str]) -> None:
    _, url = http_hub
    async with http_client(None) as http:
        response = await http.get(f"{url}/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok", "database": True}


def test_http_needs_a_token_everywhere() -> None:
    with pytest.raises(ConfigError, match="non-loopback"):
        check_http_token("0.0.0.0", None)
    with pytest.raises(ConfigError, match="loopback address too"):
        check_http_token("127.0.0.1", "")
    with pytest.raises(ConfigError, match="at least 16"):
        check_http_token("127.0.0.1", "short")
    assert check_http_token("::1", TOKEN) == TOKEN
    done = subprocess.run([*cli_command(), "serve", "--transport", "http", "--host", "0.0.0.0"], env=clean_environ(),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stdout == ""
    assert "bearer token" in done.stderr and "Traceback" not in done.stderr
