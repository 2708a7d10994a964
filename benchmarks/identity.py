"""What identities cost on the call path: ``python -m benchmarks.identity``.

Two parts, each against its baseline in the same run:

1. verifying one bearer token: the static ``--token`` (a constant-time compare) against an admin-issued token
   (one ``caller_identity()`` lookup through the gateway's pool) and a JWT (an RS256 signature check, key cached);
2. end to end over Streamable HTTP with the ``mcp`` client: a no-op tool call through the single-caller gateway
   (static token) against the same call through the gateway serving identities (token lookup, the identity's own
   caller-role engine, quota check, audit line and row), at 1 and 8 concurrent calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import asyncpg
import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_hotmesh._caller import Engine
from mcp_hotmesh._http import StaticTokenVerifier, run_http
from mcp_hotmesh._identity import IdentityVerifier, OAuthSettings, RoleRule, add_token, parse_config
from mcp_hotmesh._identity_gateway import IdentityGateway
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._migrate import migrate
from mcp_hotmesh._postgres import create_pool
from mcp_hotmesh._roles import provision_role

from .common import Result, closed_loop, compare, loop_result, percentile, ratio_text
from .db import Database, database
from .e2e import SCHEMA, worker_in_process
from .tools import STREAM

STATIC = "bench-static-token-0123456789"


@contextlib.contextmanager
def jwks_server(key: rsa.RSAPrivateKey) -> Iterator[str]:
    jwk = {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": "k", "use": "sig", "alg": "RS256"}
    body = json.dumps({"keys": [jwk]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


async def timed(verify: Any, token: str, count: int) -> Result:
    latencies = []
    for _ in range(count):
        t0 = time.perf_counter()
        assert await verify(token) is not None
        latencies.append((time.perf_counter() - t0) * 1000)
    total = sum(latencies) / 1000
    return Result("1 verify", "", 1, count, total, count / total, percentile(latencies, 0.5),
                  percentile(latencies, 0.99))


@contextlib.asynccontextmanager
async def http(gateway: McpGateway, token: str | None) -> AsyncIterator[str]:
    port = 20_000 + (id(gateway) % 10_000)
    async with anyio.create_task_group() as tg:
        stop, started = anyio.Event(), anyio.Event()
        tg.start_soon(lambda: run_http(gateway, host="127.0.0.1", port=port, token=token, stop=stop,
                                       started=started))
        await started.wait()
        yield f"http://127.0.0.1:{port}/mcp"
        stop.set()


async def calls(url: str, token: str, lanes: int, seconds: float) -> tuple[int, float, list[float]]:
    async with contextlib.AsyncExitStack() as es:
        clients = []
        for _ in range(lanes):
            http_client = await es.enter_async_context(httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {token}"}, timeout=60))
            clients.append(await es.enter_async_context(Client(streamable_http_client(url, http_client=http_client))))

        async def op(lane: int) -> None:
            result = await clients[lane].call_tool("noop", {})
            assert not result.is_error

        return await closed_loop(op, lanes, seconds=seconds, warmup=1.0)


async def main(seconds: float) -> None:
    logging.basicConfig(level=logging.WARNING)
    with database() as db:
        await run(db, seconds)


async def run(db: Database, seconds: float) -> None:
    admin = await asyncpg.connect(db.admin_dsn)
    try:
        await migrate(admin, SCHEMA)
        gateway_role = await provision_role(admin, [STREAM], "caller", schema=SCHEMA)
        team_role = await provision_role(admin, [STREAM], "caller", schema=SCHEMA)
        worker_role = await provision_role(admin, [STREAM], "worker", schema=SCHEMA)
        token = await add_token(admin, f"bench-{int(time.time())}", team_role.role, schema=SCHEMA)
    finally:
        await admin.close()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    results: list[Result] = []
    with jwks_server(key) as jwks_url:
        oauth = OAuthSettings(issuer="https://issuer.bench", audience="https://bench/mcp", jwks_url=jwks_url,
                              resource="https://bench/mcp", roles=(RoleRule("scope", "bench", team_role.role),))
        signed = jwt.encode({"iss": oauth.issuer, "aud": oauth.audience, "sub": "bench", "scope": "bench",
                             "exp": int(time.time()) + 3600}, key, algorithm="RS256", headers={"kid": "k"})
        dsn = db.role_dsn(gateway_role.role, gateway_role.password)
        pool = await create_pool(dsn, min_size=1, max_size=10)
        try:
            verifier = IdentityVerifier(pool, SCHEMA, oauth)
            static = await timed(StaticTokenVerifier(STATIC).verify_token, STATIC, 2000)
            static.name = "static --token"
            looked_up = await timed(verifier.verify_token, token, 2000)
            looked_up.name = "tokens table"
            checked = await timed(verifier.verify_token, signed, 2000)
            checked.name = "JWT (RS256)"
            for r in (looked_up, checked):
                compare(r, static, "static")
            results += [static, looked_up, checked]

            async with worker_in_process(db, worker_role, 32):
                engine = Engine(pool, schema=SCHEMA, role=gateway_role.role, listen_dsn=dsn, timeout=60.0)
                async with engine, anyio.create_task_group() as tg:
                    for _ in range(600):
                        await engine.refresh()
                        if any(r.name == "noop" and r.live_workers for r in engine.tools()):
                            break
                        await asyncio.sleep(0.05)
                    config = parse_config({"logins": {team_role.role: {"password": team_role.password}},
                                           "oauth": {"issuer": oauth.issuer, "jwks_url": jwks_url,
                                                     "resource": oauth.resource,
                                                     "roles": [{"claim": "scope", "value": "bench",
                                                                "role": team_role.role}]},
                                           "quotas": [{"identity": "*", "rate": 1e6, "concurrent": 1000}],
                                           "pools": {"size": 10}})  # as the single caller's pool
                    logging.getLogger("mcp_hotmesh.audit").setLevel(logging.WARNING)  # lines are made, not shown
                    team: IdentityGateway = await tg.start(IdentityGateway(engine, config).run)
                    single = McpGateway(engine)
                    async with http(single, STATIC) as single_url, http(team, None) as team_url:
                        for lanes in (1, 8):
                            base = loop_result("2 e2e", "single caller (--token)", lanes,
                                               await calls(single_url, STATIC, lanes, seconds))
                            ours = loop_result("2 e2e", "identities (tokens table)", lanes,
                                               await calls(team_url, token, lanes, seconds))
                            by_jwt = loop_result("2 e2e", "identities (JWT)", lanes,
                                                 await calls(team_url, signed, lanes, seconds))
                            compare(ours, base, "static")
                            compare(by_jwt, base, "static")
                            results += [base, ours, by_jwt]
                    tg.cancel_scope.cancel()
        finally:
            await pool.close()
    print(f"{'part':8} {'case':28} {'conc':>4} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8}  vs static token")
    for r in results:
        print(f"{r.part:8} {r.name:28} {r.concurrency or '':>4} {r.rate or 0:9.0f} {r.p50_ms or 0:8.3f} "
              f"{r.p99_ms or 0:8.3f}  {ratio_text(r, 'static')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="recorded seconds per end-to-end case")
    asyncio.run(main(parser.parse_args().seconds))
