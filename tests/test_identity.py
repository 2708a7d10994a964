"""Identities over HTTP: admin-issued tokens and OAuth JWTs (signed by a key this test makes, its JWKS served by
a local HTTP server), each identity acting as its own caller role; the audit trail; quotas."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID

import anyio
import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import INVALID_PARAMS

from mcp_hotmesh import _audit
from mcp_hotmesh._http import run_http, transport_security
from mcp_hotmesh._identity import add_token, load_config, parse_config, revoke_token
from mcp_hotmesh._identity_gateway import IdentityGateway
from mcp_hotmesh._roles import ProvisionedRole
from mcp_hotmesh.errors import ConfigError, NotFound
from tests.helpers import LEGACY, Env, Hub, Raw, RpcError, free_port, http_client, hub_for, text_of, wait_for

pytestmark = pytest.mark.anyio

ISSUER = "https://issuer.test"
ANALYST_TOOLS = {"echo", "test_block"}  # the analysts' role: streams echo and test.block
BODY = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
INSPECTOR = os.environ.get("HOTMESH_TEST_INSPECTOR") or shutil.which("mcp-inspector")
"""The MCP Inspector 2.x's command (npm install @modelcontextprotocol/inspector@2), when this machine has it."""


# ---------------------------------------------------------------------------------------- the issuer
class Issuer:
    """An OAuth issuer's signing key and its JWKS, served over HTTP (counting fetches)."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "key-1"
        self.fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.fetches += 1
                jwk = json.loads(RSAAlgorithm.to_jwk(issuer.key.public_key()))
                body = json.dumps({"keys": [{**jwk, "kid": issuer.kid, "use": "sig", "alg": "RS256"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.jwks_url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    @contextlib.contextmanager
    def serving(self) -> Iterator[Issuer]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()

    def token(self, audience: str, *, key: Any = None, kid: str | None = None, algorithm: str = "RS256",
              **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": audience, "sub": "alice@example.com", "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, key if key is not None else self.key, algorithm=algorithm,
                          headers={"kid": kid or self.kid})


# ------------------------------------------------------------------------------------------ the team
@dataclass
class Team:
    env: Env
    hub: Hub
    gateway: IdentityGateway
    url: str
    issuer: Issuer
    analysts: ProvisionedRole
    ops: ProvisionedRole

    @property
    def resource(self) -> str:
        return f"{self.url}/mcp"

    def jwt(self, **claims: Any) -> str:
        return self.issuer.token(self.resource, **claims)

    async def token(self, name: str, role: ProvisionedRole) -> str:
        return await add_token(self.env.admin, name, role.role, schema=self.env.schema)

    async def running_call(self, role: ProvisionedRole) -> UUID:
        """The call of ``role`` that is queued or running, once there is one (a test started it in a task)."""
        query = (f'SELECT call_id FROM "{self.env.schema}".messages WHERE owner = $1 AND call_id IS NOT NULL '
                 "AND state IN ('ready', 'reserved') ORDER BY id DESC LIMIT 1")

        async def one() -> bool:
            return await self.env.admin.fetchval(query, role.role) is not None

        await wait_for(one, 20)
        call_id: UUID = await self.env.admin.fetchval(query, role.role)
        return call_id


@contextlib.asynccontextmanager
async def team_for(env: Env, *, quotas: list[dict[str, Any]] | None = None,
                   pools: dict[str, Any] | None = None) -> AsyncIterator[Team]:
    """A worker, a gateway serving identities on HTTP, two caller roles (analysts: echo and test_block; ops: every
    tool), and an issuer whose ``groups`` claim ``analysts`` or scope ``tools:ops`` map to them."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Issuer().serving() as issuer:
        async with hub_for(env) as hub:
            analysts = await env.provision(["echo", "test.block"], "caller")
            ops = await env.provision(sorted({r.stream for r in hub.engine.tools()}), "caller")
            config = parse_config({
                "logins": {analysts.role: {"password": analysts.password}, ops.role: {"password": ops.password}},
                "oauth": {"issuer": ISSUER, "resource": f"{url}/mcp", "jwks_url": issuer.jwks_url,
                          "algorithms": ["RS256"],
                          "roles": [{"claim": "groups", "value": "analysts", "role": analysts.role},
                                    {"claim": "scope", "value": "tools:ops", "role": ops.role}]},
                "quotas": quotas or [],
                "pools": pools or {},
            })
            async with anyio.create_task_group() as tg:
                gateway: IdentityGateway = await tg.start(IdentityGateway(hub.engine, config).run)
                stop, started, done = anyio.Event(), anyio.Event(), anyio.Event()

                async def serve() -> None:
                    await run_http(gateway, host="127.0.0.1", port=port, token=None, stop=stop, started=started)
                    done.set()

                tg.start_soon(serve)
                with anyio.fail_after(10):
                    await started.wait()
                yield Team(env, hub, gateway, url, issuer, analysts, ops)
                stop.set()
                with anyio.move_on_after(10):
                    await done.wait()
                tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def connected(team: Team, token: str, mode: str = "auto") -> AsyncIterator[Client]:
    """The MCP SDK's client with ``Authorization: Bearer <token>``."""
    async with http_client(token) as http, Client(streamable_http_client(team.resource, http_client=http),
                                                  read_timeout_seconds=60, mode=mode) as client:
        yield client


@pytest.fixture
async def team(env: Env) -> AsyncIterator[Team]:
    async with team_for(env) as team:
        yield team


async def tool_names(client: Client) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["auto", "legacy"])  # both protocol eras
async def test_each_identity_sees_and_calls_only_its_roles_tools(team: Team, mode: str) -> None:
    every_tool = {r.name for r in team.hub.engine.tools()}
    async with connected(team, team.jwt(groups=["analysts"]), mode) as alice:  # a JWT mapped by its groups claim
        assert await tool_names(alice) == ANALYST_TOOLS
        echoed = await alice.call_tool("echo", {"text": "hi"})
        assert echoed.structured_content == {"text": "hi", "length": 2}
        with pytest.raises(MCPError) as exc:  # ops' tool: the database does not list it for her role
            await alice.call_tool("math_add", {"a": 1, "b": 2})
        assert exc.value.code == INVALID_PARAMS
    async with connected(team, await team.token("bob", team.ops), mode) as bob:  # an admin-issued token
        assert await tool_names(bob) == every_tool != ANALYST_TOOLS
        assert (await bob.call_tool("math_add", {"a": 1, "b": 2})).structured_content == {"result": 3.0}
    async with connected(team, team.jwt(sub="carol", scope="openid tools:ops"), mode) as carol:  # mapped by scope
        assert await tool_names(carol) == every_tool
    # each identity's calls were made as its own caller role
    owners = {r["owner"] for r in await team.env.admin.fetch(f'SELECT owner FROM "{team.env.schema}".messages')}
    assert owners == {team.analysts.role, team.ops.role}


@pytest.mark.parametrize("case", ["wrong audience", "expired", "wrong issuer", "alg none", "unknown key",
                                  "key not the issuer's", "no role", "not a token"])
async def test_bad_tokens_get_401_with_the_challenge(team: Team, case: str) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = {
        "wrong audience": lambda: team.issuer.token("https://another.example/mcp", groups=["analysts"]),
        "expired": lambda: team.jwt(groups=["analysts"], iat=now - 7200, exp=now - 3600),
        "wrong issuer": lambda: team.jwt(groups=["analysts"], iss="https://evil.example"),
        "alg none": lambda: jwt.encode({"iss": ISSUER, "aud": team.resource, "sub": "mallory", "exp": now + 300,
                                        "groups": ["analysts"]}, "", algorithm="none", headers={"kid": "key-1"}),
        "unknown key": lambda: team.issuer.token(team.resource, key=other, kid="key-2", groups=["analysts"]),
        "key not the issuer's": lambda: team.issuer.token(team.resource, key=other, groups=["analysts"]),
        "no role": lambda: team.jwt(groups=["visitors"]),
        "not a token": lambda: "hm_" + "x" * 43,
    }[case]()
    async with http_client(token) as http:
        response = await http.post(team.resource, json=BODY)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    metadata_url = f"{team.url}/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{metadata_url}"' in challenge
    async with http_client(None) as http:  # RFC 9728: where to get a token
        metadata = (await http.get(metadata_url)).json()
    assert metadata["resource"] == team.resource and metadata["authorization_servers"] == [ISSUER]


async def test_unknown_key_ids_refetch_the_key_set_at_most_now_and_then(team: Team) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with http_client(team.jwt(groups=["analysts"])) as http:
        assert (await http.post(team.resource, json=BODY)).status_code != 401
    fetched = team.issuer.fetches
    for i in range(5):  # made-up key ids: the first may fetch again, the rest wait out the interval
        async with http_client(team.issuer.token(team.resource, key=other, kid=f"made-up-{i}")) as http:
            assert (await http.post(team.resource, json=BODY)).status_code == 401
    assert team.issuer.fetches <= fetched + 1


async def test_identities_cannot_read_or_cancel_each_others_calls(team: Team) -> None:
    bob_token = await team.token("bob", team.ops)
    async with connected(team, team.jwt(groups=["analysts"])) as alice, connected(team, bob_token) as bob:
        assert await tool_names(bob) != await tool_names(alice)
        async with anyio.create_task_group() as tg:
            tg.start_soon(alice.call_tool, "test_block", {})
            call_id = await team.running_call(team.analysts)
            bobs = team.gateway.engines.engine_of(team.ops.role)
            assert bobs is not None  # bob's engine: logged in as his role, as his requests are served
            with pytest.raises(NotFound):
                await bobs.api.result(call_id)
            with pytest.raises(NotFound):
                await bobs.api.cancel(call_id)
            assert (await team.env.call_row(call_id))["state"] in ("ready", "reserved")  # hers runs on
            alices = team.gateway.engines.engine_of(team.analysts.role)
            assert alices is not None and not (await alices.api.result(call_id)).finished
            tg.cancel_scope.cancel()  # alice gives up: her own cancellation reaches the database

        async def cancelled() -> bool:
            return bool((await team.env.call_row(call_id))["state"] == "cancelled")

        await wait_for(cancelled, 20)
        await team.hub.still_serving(bob)


async def test_a_task_belongs_to_its_identitys_role(team: Team) -> None:
    """A task is served through the requesting identity's own caller role: another identity's role cannot read,
    wait for or cancel it, and its owner can."""
    bob_token = await team.token("bob", team.ops)
    async with http_client(team.jwt(groups=["analysts"])) as alice_http, http_client(bob_token) as bob_http:
        alice, bob = Raw(alice_http, team.url, LEGACY), Raw(bob_http, team.url, LEGACY)
        await alice.open()
        await bob.open()
        created = await alice.request("tools/call", {"name": "test_block", "arguments": {}, "task": {"ttl": 60000}})
        task_id = created["task"]["taskId"]
        assert (await team.env.call_row(UUID(task_id)))["owner"] == team.analysts.role
        for method in ("tasks/get", "tasks/cancel", "tasks/result"):
            with pytest.raises(RpcError, match="No such task"):
                await bob.request(method, {"taskId": task_id})
        assert (await alice.request("tasks/get", {"taskId": task_id}))["status"] == "working"
        assert (await team.env.call_row(UUID(task_id)))["state"] in ("ready", "reserved")  # bob changed nothing
        assert (await alice.request("tasks/cancel", {"taskId": task_id}))["status"] == "cancelled"
        assert (await team.env.call_row(UUID(task_id)))["state"] == "cancelled"


async def test_a_resumed_stream_is_served_as_its_identitys_role(team: Team) -> None:
    """Reconnecting to a call's stream (``Last-Event-ID``) looks the call up as the token's own caller role:
    another identity's role finds nothing, the owner's gets the stream."""
    bob_token = await team.token("bob", team.ops)
    alice_token = team.jwt(groups=["analysts"])
    async with connected(team, alice_token) as alice, anyio.create_task_group() as tg:
        tg.start_soon(alice.call_tool, "test_block", {})
        call_id = await team.running_call(team.analysts)
        headers = {"Accept": "text/event-stream", "Last-Event-ID": f"{call_id}:7", "MCP-Protocol-Version": LEGACY}
        async with http_client(bob_token) as bob_http:
            assert (await bob_http.get(team.resource, headers=headers)).status_code == 404
        async with http_client(None) as anonymous:
            assert (await anonymous.get(team.resource, headers=headers)).status_code == 401
        async with http_client(alice_token) as alice_http, alice_http.stream(
                "GET", team.resource, headers=headers) as resumed:
            assert resumed.status_code == 200 and resumed.headers["content-type"].startswith("text/event-stream")
        tg.cancel_scope.cancel()


async def test_a_revoked_token_is_refused_at_once(team: Team) -> None:
    token = await team.token("dave", team.analysts)
    async with connected(team, token) as dave:
        assert await tool_names(dave) == ANALYST_TOOLS
        await revoke_token(team.env.admin, "dave", schema=team.env.schema)
        with pytest.raises(Exception):  # noqa: B017 - the next request is refused (401)
            await dave.list_tools()
    async with http_client(token) as http:
        assert (await http.post(team.resource, json=BODY)).status_code == 401
    # issued again: a new token, the old one stays refused
    again = await team.token("dave", team.analysts)
    async with connected(team, again) as dave:
        assert await tool_names(dave) == ANALYST_TOOLS
    async with http_client(token) as http:
        assert (await http.post(team.resource, json=BODY)).status_code == 401


async def test_the_audit_line_and_the_audit_query_agree(team: Team, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcp_hotmesh.audit")
    bob_token = await team.token("bob", team.ops)
    async with connected(team, team.jwt(groups=["analysts"])) as alice, connected(team, bob_token) as bob:
        assert not (await alice.call_tool("echo", {"text": "secret words"})).is_error
        assert (await alice.call_tool("echo", {"text": 5})).is_error  # invalid arguments
        assert (await bob.call_tool("test_fail", {"reason": "broken"})).is_error
        assert not (await bob.call_tool("math_add", {"a": 1, "b": 2})).is_error
    lines = [r for r in caplog.records if r.name == "mcp_hotmesh.audit" and getattr(r, "audit", False)]
    assert len(lines) == 4

    def fact(d: dict[str, Any]) -> tuple[Any, ...]:
        return (d["identity"], d["role"], d["tool"], d["call_id"], d["outcome"], d["args_bytes"])

    logged = sorted((fact(vars(r)) for r in lines), key=repr)
    assert {f[4] for f in logged} == {"ok", "invalid_arguments", "error"}
    assert ("alice@example.com", team.analysts.role, "echo") in {f[:3] for f in logged}

    async def written() -> bool:
        return len(await _audit.query(team.env.admin, schema=team.env.schema)) == 4

    await wait_for(written, 10)
    stored = sorted((fact(r.as_json()) for r in await _audit.query(team.env.admin, schema=team.env.schema)),
                    key=repr)
    assert stored == logged
    only_bob = await _audit.query(team.env.admin, schema=team.env.schema, identity="bob", tool="math_add")
    assert [(r.identity, r.tool, r.outcome) for r in only_bob] == [("bob", "math_add", "ok")]
    # argument values are not recorded (only sizes), in the line or the table
    assert "secret words" not in caplog.text
    assert not await team.env.admin.fetchval(
        f'SELECT count(*) FROM "{team.env.schema}".audit WHERE arguments IS NOT NULL')


async def test_an_audit_row_names_the_role_that_wrote_it(team: Team) -> None:
    """A caller role writing audit rows itself cannot attribute them to another role."""
    async with team.env.session(team.analysts) as conn:
        forged = json.dumps([{"identity": "bob", "role": team.ops.role, "role_name": team.ops.role, "tool": "add",
                              "outcome": "ok", "duration_ms": 1, "args_bytes": 1, "result_bytes": 1}])
        await conn.fetchval(f'SELECT "{team.env.schema}".caller_audit($1::jsonb)', forged)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f'SELECT * FROM "{team.env.schema}".audit')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f'SELECT * FROM "{team.env.schema}".tokens')
    rows = await _audit.query(team.env.admin, schema=team.env.schema, identity="bob")
    assert [r.role for r in rows] == [team.analysts.role]


async def test_quotas_refuse_the_exceeding_call_and_let_the_next_window_through(env: Env) -> None:
    quotas = [{"identity": "alice*", "tool": "echo", "rate": 1, "burst": 2},
              {"identity": "*", "tool": "test_block", "concurrent": 1}]
    async with team_for(env, quotas=quotas) as team, connected(team, team.jwt(groups=["analysts"])) as alice:
        assert not (await alice.call_tool("echo", {"text": "1"})).is_error
        assert not (await alice.call_tool("echo", {"text": "2"})).is_error
        refused = await alice.call_tool("echo", {"text": "3"})
        assert refused.is_error and "Quota reached" in text_of(refused) and "per second" in text_of(refused)
        await anyio.sleep(1.5)  # the bucket refills one call per second
        assert not (await alice.call_tool("echo", {"text": "4"})).is_error

        async with anyio.create_task_group() as tg:  # concurrency: one test_block at a time
            tg.start_soon(alice.call_tool, "test_block", {})

            async def one_running() -> bool:
                return sum(team.gateway.quotas._active.values()) == 1

            await wait_for(one_running, 20)
            second = await alice.call_tool("test_block", {})
            assert second.is_error and "at most 1 call(s) at once" in text_of(second)
            tg.cancel_scope.cancel()

        async def released() -> bool:
            return not team.gateway.quotas._active

        await wait_for(released, 20)
        with anyio.move_on_after(1):  # admitted now: it blocks (until cancelled) instead of being refused
            await alice.call_tool("test_block", {})
        metrics = await team.gateway.metrics_text()
        assert 'hotmesh_gateway_quota_refusals_total{identity="alice@example.com",tool="echo"} 1' in metrics
        assert 'hotmesh_gateway_quota_refusals_total{identity="alice@example.com",tool="test_block"} 1' in metrics
        async def quota_rows() -> bool:
            rows = await _audit.query(team.env.admin, schema=team.env.schema)
            return sum(r.outcome == "quota" for r in rows) == 2

        await wait_for(quota_rows, 10)  # refusals are audited too


async def test_role_engines_are_bounded_and_closed_when_idle(env: Env) -> None:
    async with team_for(env, pools={"max_roles": 1, "idle_seconds": 1}) as team:
        engines = team.gateway.engines
        bob_token = await team.token("bob", team.ops)
        async with connected(team, team.jwt(groups=["analysts"])) as alice:
            assert await tool_names(alice) == ANALYST_TOOLS
            assert engines.engine_of(team.analysts.role) is not None

            async def closed() -> bool:
                return engines.engine_of(team.analysts.role) is None

            await wait_for(closed, 20)  # idle for a second: closed (its pool and LISTEN connection with it)
            assert await tool_names(alice) == ANALYST_TOOLS  # and made again on the next request
            async with connected(team, bob_token) as bob:
                # one role at a time: alice's idle engine makes room for bob's
                assert await tool_names(bob) != ANALYST_TOOLS
                assert engines.engine_of(team.analysts.role) is None
                async with anyio.create_task_group() as tg:  # bob's call in flight: his engine is busy
                    tg.start_soon(bob.call_tool, "test_block", {})
                    await team.running_call(team.ops)
                    refused = await alice.call_tool("echo", {"text": "hi"})
                    assert refused.is_error and "too many roles at once" in text_of(refused)
                    tg.cancel_scope.cancel()
                await team.hub.still_serving(bob)


async def test_a_role_without_a_login_is_a_clear_error(team: Team) -> None:
    stranger = await team.env.provision(["echo"], "caller")  # a caller role the configuration has no login for
    async with connected(team, await team.token("erin", stranger)) as erin:
        with pytest.raises(MCPError, match="no login for your role"):
            await erin.list_tools()
        result = await erin.call_tool("echo", {"text": "hi"})
        assert result.is_error and "no login for your role" in text_of(result)


def test_configuration_mistakes_are_one_clear_line(tmp_path: Any) -> None:
    oauth = {"issuer": ISSUER, "resource": "https://mcp.example/mcp", "jwks_url": "https://x/jwks",
             "roles": [{"claim": "groups", "value": "a", "role": "r"}]}
    base: dict[str, Any] = {"oauth": oauth}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"oauth": {**oauth, "algorithms": ["HS256"]}}, "algorithms must be"),
        ({"oauth": {**oauth, "algorithms": ["none"]}}, "algorithms must be"),
        ({"oauth": {**oauth, "roles": []}}, "at least one [[oauth.roles]]"),
        ({"logins": {"r": {"password_env": "HOTMESH_TEST_NOT_SET"}}}, "which is not set"),
        ({"quotas": [{"identity": "*"}]}, "give rate"),
        ({"quotas": [{"rate": -1}]}, "positive number"),
        ({"tokens": {}}, "unknown section"),
    ]
    for bad, words in cases:
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_config(bad)
    config = parse_config(base)
    assert config.oauth is not None and config.oauth.audience == "https://mcp.example/mcp"
    broken = tmp_path / "broken.toml"
    broken.write_text("[logins\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not a host name"):
        transport_security("127.0.0.1", ["https://mcp.example.com"])
    named = transport_security("0.0.0.0", ["mcp.example.com"])
    assert named is not None and "mcp.example.com:*" in named.allowed_hosts
    assert "127.0.0.1:*" not in named.allowed_hosts  # loopback names only when serving on loopback


async def test_plain_http_on_a_public_address_warns(team: Team, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with anyio.create_task_group() as tg:
        stop, started = anyio.Event(), anyio.Event()
        tg.start_soon(lambda: run_http(team.gateway, host="0.0.0.0", port=port, token=None, stop=stop,
                                       started=started, allowed_hosts=["mcp.example.com"]))
        with anyio.fail_after(10):
            await started.wait()
        async with http_client(await team.token("fay", team.analysts)) as http:
            headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
            named = await http.post(f"http://127.0.0.1:{port}/mcp", json=BODY,
                                    headers={**headers, "Host": "mcp.example.com"})
            rebound = await http.post(f"http://127.0.0.1:{port}/mcp", json=BODY,
                                      headers={**headers, "Host": "evil.example"})
        assert named.status_code != 421 and rebound.status_code == 421
        stop.set()
    assert any("TLS-terminating proxy" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.skipif(not INSPECTOR, reason="no MCP Inspector 2.x here (npm install @modelcontextprotocol/inspector@2, "
                    "then HOTMESH_TEST_INSPECTOR=.../node_modules/.bin/mcp-inspector)")
async def test_the_mcp_inspector_connects_with_a_header(team: Team) -> None:
    assert INSPECTOR is not None
    token = await team.token("gus", team.analysts)

    async def inspector(*args: str) -> Any:
        with anyio.fail_after(120):
            return await anyio.run_process([INSPECTOR, "--cli", team.resource, "--transport", "http", *args],
                                           check=False)

    listed = await inspector("--header", f"Authorization: Bearer {token}", "--method", "tools/list")
    assert listed.returncode == 0, listed.stderr
    assert {t["name"] for t in json.loads(listed.stdout)["tools"]} == ANALYST_TOOLS
    called = await inspector("--header", f"Authorization: Bearer {token}", "--method", "tools/call",
                             "--tool-name", "echo", "--tool-arg", "text=hi")
    assert called.returncode == 0 and json.loads(called.stdout)["structuredContent"] == {"text": "hi", "length": 2}
    refused = await inspector("--header", "Authorization: Bearer hm_not-a-token", "--method", "tools/list")
    assert refused.returncode != 0


async def test_audit_rows_are_kept_for_the_retention_period(env: Env) -> None:
    caller = await env.provision(["echo"], "caller")
    await env.set("audit_retention_ms", 60_000)
    await env.admin.execute(
        f"INSERT INTO \"{env.schema}\".audit (at, identity, role_name, tool, outcome, duration_ms, args_bytes, "
        "result_bytes) VALUES (now() - interval '2 minutes', 'old', $1, 'echo', 'ok', 1, 1, 1), "
        "(now() - interval '30 seconds', 'recent', $1, 'echo', 'ok', 1, 1, 1)", caller.role)
    async with env.session(caller) as conn:
        row = {"at": "2999-01-01T00:00:00Z", "identity": "new", "tool": "echo", "outcome": "ok", "duration_ms": 2,
               "args_bytes": 3, "result_bytes": 4}
        assert await conn.fetchval(f'SELECT "{env.schema}".caller_audit($1::jsonb)', json.dumps([row])) == 1
        with pytest.raises(asyncpg.PostgresError, match="invalid audit record"):
            await conn.fetchval(f'SELECT "{env.schema}".caller_audit($1::jsonb)',
                                json.dumps([{**row, "call_id": "not-a-uuid"}]))
        with pytest.raises(asyncpg.PostgresError, match="JSON array"):
            await conn.fetchval(f'SELECT "{env.schema}".caller_audit($1::jsonb)', json.dumps(row))
    kept = await _audit.query(env.admin, schema=env.schema)
    # the old row is purged; a row dated in the future is recorded as of now
    assert sorted(r.identity for r in kept) == ["new", "recent"]
    assert max(r.at for r in kept).year < 2999
