"""Identities from the command line: ``tokens add|list|revoke``, ``audit``, and ``serve --identity-config`` with
three people, two caller roles and one gateway, its JSON audit lines read back with ``audit --json``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_hotmesh._identity import add_token
from tests.helpers import ROOT, Env, clean_environ, cli_command, free_port, http_client, ok, one_line_error, run_cli

pytestmark = pytest.mark.anyio


def admin_args(env: Env) -> list[str]:
    return ["--dsn", env.server.admin_dsn, "--schema", env.schema]


async def test_tokens_add_list_and_revoke(env: Env) -> None:
    caller = await env.provision(["echo"], "caller")
    worker = await env.provision(["echo"], "worker")
    added = json.loads(ok(await run_cli("tokens", "add", "alice", "--role", caller.role, "--json",
                                        *admin_args(env))).stdout)
    token = added["token"]
    assert added["name"] == "alice" and added["role"] == caller.role and token.startswith("hm_") and len(token) > 40
    stored = await env.admin.fetchval(f'SELECT token_hash FROM "{env.schema}".tokens WHERE name = $1', "alice")
    assert stored == hashlib.sha256(token.encode()).digest()  # only the hash is kept
    listed = ok(await run_cli("tokens", "list", "--json", *admin_args(env))).stdout
    assert token not in listed
    assert [(t["name"], t["role"], t["revoked_at"]) for t in json.loads(listed)] == [("alice", caller.role, None)]
    text = ok(await run_cli("tokens", *admin_args(env))).stdout
    assert "alice" in text and caller.role in text

    assert "already has a token" in one_line_error(
        await run_cli("tokens", "add", "alice", "--role", caller.role, *admin_args(env)), "tokens", 1)
    assert "not a caller role" in one_line_error(
        await run_cli("tokens", "add", "mallory", "--role", worker.role, *admin_args(env)), "tokens", 2)
    assert "not a caller role" in one_line_error(
        await run_cli("tokens", "add", "mallory", "--role", "no_such_role", *admin_args(env)), "tokens", 2)
    assert "invalid identity name" in one_line_error(
        await run_cli("tokens", "add", "bad name", "--role", caller.role, *admin_args(env)), "tokens", 2)
    assert "--role" in one_line_error(await run_cli("tokens", "add", "eve", *admin_args(env)), "tokens", 2)

    ok(await run_cli("tokens", "revoke", "alice", *admin_args(env)))
    revoked = json.loads(ok(await run_cli("tokens", "list", "--json", *admin_args(env))).stdout)
    assert revoked[0]["revoked_at"] is not None
    assert "no unrevoked token" in one_line_error(
        await run_cli("tokens", "revoke", "alice", *admin_args(env)), "tokens", 1)
    # a caller role cannot list or issue tokens
    caller_dsn = env.dsn(caller)
    assert "permission denied" in one_line_error(
        await run_cli("tokens", "list", "--dsn", caller_dsn, "--schema", env.schema), "tokens", 1).lower()


async def test_audit_with_nothing_recorded_and_bad_filters(env: Env) -> None:
    assert ok(await run_cli("audit", *admin_args(env))).stdout == "no audit records\n"
    assert "invalid duration" in one_line_error(
        await run_cli("audit", "--since", "yesterday", *admin_args(env)), "audit", 2)


def write_config(path: Path, logins: dict[str, str], extra: str = "") -> Path:
    lines = []
    for role, password_env in logins.items():
        lines += [f'[logins."{role}"]', f'password_env = "{password_env}"', ""]
    path.write_text("\n".join(lines) + extra)
    return path


@contextlib.asynccontextmanager
async def serving(args: list[str], environ: dict[str, str], stderr: list[str]) -> AsyncIterator[str]:
    """``mcp-hotmesh serve ARGS`` until the block ends (SIGTERM); yields its base URL; collects stderr lines."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = await anyio.open_process([*cli_command(), "serve", "--transport", "http", "--port", str(port), *args],
                                       env=environ, cwd=ROOT, stdin=None)
    async with process, anyio.create_task_group() as tg:

        async def read(stream: anyio.abc.ByteReceiveStream) -> None:
            buffer = b""
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                stderr.extend(line.decode() for line in lines)

        assert process.stderr is not None
        tg.start_soon(read, process.stderr)
        async with http_client(None) as http:
            with anyio.fail_after(90):
                while True:
                    assert process.returncode is None, "\n".join(stderr)
                    with contextlib.suppress(Exception):
                        if (await http.get(f"{url}/healthz")).status_code == 200:
                            break
                    await anyio.sleep(0.2)
        try:
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await process.wait()


@pytest.mark.slow
async def test_a_team_on_one_gateway(env: Env, tmp_path: Path) -> None:
    """Three people, two caller roles, one gateway (the README's team setup): each sees and calls its role's tools,
    the gateway writes one JSON audit line per call, and ``audit --json`` reads the same calls back."""
    readers = await env.provision(["echo"], "caller")
    mathers = await env.provision(["echo", "math"], "caller")
    config = write_config(tmp_path / "team.toml", {readers.role: "READERS_PASSWORD", mathers.role: "MATH_PASSWORD"},
                          '\n[[quotas]]\nidentity = "*"\nrate = 50\nconcurrent = 8\n')
    tokens = {name: await add_token(env.admin, name, role.role, schema=env.schema)
              for name, role in [("ann", readers), ("ben", mathers), ("cat", mathers)]}
    environ = clean_environ(READERS_PASSWORD=readers.password, MATH_PASSWORD=mathers.password)
    stderr: list[str] = []
    args = [*admin_args(env), "--identity-config", str(config), "--log-format", "json",
            "--allowed-host", "mcp.team.test"]
    async with serving(args, environ, stderr) as url:
        seen: dict[str, set[str]] = {}
        for name, token in tokens.items():
            async with http_client(token) as http, Client(
                    streamable_http_client(f"{url}/mcp", http_client=http), read_timeout_seconds=60) as client:
                seen[name] = {t.name for t in (await client.list_tools()).tools}
                echoed = await client.call_tool("echo", {"text": name})
                assert echoed.structured_content == {"text": name, "length": 3}
                if name != "ann":
                    assert (await client.call_tool("math_add", {"a": 2, "b": 3})).structured_content == {"result": 5.0}
        assert seen == {"ann": {"echo"}, "ben": {"echo", "math_add", "math_multiply"},
                        "cat": {"echo", "math_add", "math_multiply"}}
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
        async with http_client(tokens["ann"]) as http:  # DNS-rebinding protection: the named host, and only it
            named = await http.post(f"{url}/mcp", json=body, headers={**headers, "Host": "mcp.team.test"})
            rebound = await http.post(f"{url}/mcp", json=body, headers={**headers, "Host": "evil.example"})
            assert named.status_code != 421 and rebound.status_code == 421
            assert (await http.get(f"{url}/metrics")).status_code == 401  # /metrics needs --token
    lines = [json.loads(line) for line in stderr if line.startswith("{")]
    audit_lines = [line for line in lines if line.get("audit")]
    assert len(audit_lines) == 5, stderr

    def fact(d: dict[str, Any]) -> tuple[Any, ...]:
        return (d["identity"], d["role"], d["tool"], d["call_id"], d["outcome"], d["args_bytes"], d["result_bytes"])

    stored = json.loads(ok(await run_cli("audit", "--json", *admin_args(env))).stdout)
    assert sorted(map(fact, stored)) == sorted(map(fact, audit_lines))
    assert {(d["identity"], d["role"]) for d in stored} == {("ann", readers.role), ("ben", mathers.role),
                                                           ("cat", mathers.role)}
    only_ben = json.loads(ok(await run_cli("audit", "--json", "--identity", "ben", "--tool", "math_add",
                                           "--since", "1h", *admin_args(env))).stdout)
    assert [(d["identity"], d["tool"], d["outcome"]) for d in only_ben] == [("ben", "math_add", "ok")]
    text = ok(await run_cli("audit", *admin_args(env))).stdout
    assert "ann" in text and "math_add" in text


async def test_serve_refuses_a_bad_identity_setup_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "team.toml", {"some_role": "SOME_PASSWORD_NOT_SET"})
    assert "needs --transport http" in one_line_error(
        await run_cli("serve", "--identity-config", str(config)), "serve", 2)
    assert "SOME_PASSWORD_NOT_SET, which is not set" in one_line_error(
        await run_cli("serve", "--transport", "http", "--identity-config", str(config)), "serve", 2)
    assert "cannot read the identity configuration" in one_line_error(
        await run_cli("serve", "--transport", "http", "--identity-config", str(tmp_path / "none.toml")), "serve", 2)
    assert "not a host name" in one_line_error(
        await run_cli("serve", "--transport", "http", "--token", "x" * 20, "--allowed-host", "https://a.example"),
        "serve", 2)
