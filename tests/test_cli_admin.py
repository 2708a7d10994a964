"""The admin commands of the real ``mcp-hotmesh`` CLI, run in a subprocess against the test server.

migrate, provision --json, rotate --json, revoke, roles --json: what a DBA or a deployment script runs. The
roles they hand out are then used the way a worker or gateway would: a login over TCP with the password.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.helpers import PgServer, drop_schema, ok, one_line_error, run_cli, stop_if_left_running

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # subprocesses: the real CLI


@pytest.fixture
async def schema(pg_server: PgServer) -> AsyncIterator[str]:
    """A schema name nobody has migrated yet; dropped with its roles afterwards."""
    name = "c_" + secrets.token_hex(5)
    yield name
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await drop_schema(admin, name)
    finally:
        await admin.close()


async def login(pg_server: PgServer, role: str, password: str) -> asyncpg.Connection:
    return await asyncpg.connect(pg_server.role_dsn(role, password))


async def test_migrate_provision_rotate_revoke_roles(pg_server: PgServer, schema: str) -> None:
    common = ("--dsn", pg_server.admin_dsn, "--schema", schema)
    done = ok(await run_cli("migrate", *common))
    assert done.stdout == "" and "applied 1" in done.stderr
    assert "nothing to apply" in ok(await run_cli("migrate", *common)).stderr

    worker: dict[str, Any] = json.loads(
        ok(await run_cli("provision", *common, "--kind", "worker", "--stream", "orders", "--stream", "audit", "--json"))
        .stdout
    )
    assert set(worker) == {"role", "password", "kind", "streams"}
    assert worker["kind"] == "worker" and worker["streams"] == ["orders", "audit"]
    assert worker["role"].startswith(f"{schema}_w_") and len(worker["role"].encode()) <= 63
    caller = json.loads(
        ok(await run_cli("provision", *common, "--kind", "caller", "--stream", "orders", "--json")).stdout)

    # the printed logins work over TCP, each for its kind and its streams only
    conn = await login(pg_server, worker["role"], worker["password"])
    try:
        assert await conn.fetchval(f"SELECT {schema}.worker_publish('orders', '', '{{}}')") >= 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval(f"SELECT {schema}.worker_publish('payments', '', '{{}}')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval(f"SELECT {schema}.caller_call('orders', '', '{{}}', 1000)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f"SELECT * FROM {schema}.messages")
    finally:
        await conn.close()
    conn = await login(pg_server, caller["role"], caller["password"])
    try:
        assert await conn.fetchval(f"SELECT {schema}.caller_call('orders', '', '{{}}', 1000)") is not None
    finally:
        await conn.close()

    listed = {r["role"]: r for r in json.loads(ok(await run_cli("roles", *common, "--json")).stdout)}
    assert set(listed) == {worker["role"], caller["role"]}
    assert (listed[worker["role"]]["kind"], listed[worker["role"]]["streams"]) == ("worker", ["orders", "audit"])
    assert (listed[caller["role"]]["kind"], listed[caller["role"]]["streams"]) == ("caller", ["orders"])
    assert all(r["managed"] and r["can_login"] and r["revoked_at"] is None for r in listed.values())

    rotated = json.loads(ok(await run_cli("rotate", *common, worker["role"], "--json")).stdout)
    assert rotated["role"] == worker["role"] and rotated["password"] != worker["password"]
    with pytest.raises(asyncpg.InvalidPasswordError):
        await login(pg_server, worker["role"], worker["password"])
    conn = await login(pg_server, worker["role"], rotated["password"])  # stays open across the revoke
    try:
        done = ok(await run_cli("revoke", *common, worker["role"]))
        assert done.stdout == "" and "ended 1 open session" in done.stderr
        assert conn.is_closed() or await _fails(conn)
    finally:
        conn.terminate()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await login(pg_server, worker["role"], rotated["password"])

    listed = {r["role"]: r for r in json.loads(ok(await run_cli("roles", *common, "--json")).stdout)}
    assert listed[worker["role"]]["can_login"] is False and listed[worker["role"]]["revoked_at"]
    assert listed[caller["role"]]["can_login"] is True
    table = ok(await run_cli("roles", *common)).stdout
    assert table.splitlines()[0].split()[:3] == ["ROLE", "KIND", "STREAMS"]
    assert worker["role"] in table and caller["role"] in table


async def _fails(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.exceptions.AdminShutdownError):
        return True
    return False


async def test_errors_are_one_line_with_no_traceback(pg_server: PgServer, schema: str) -> None:
    common = ("--dsn", pg_server.admin_dsn, "--schema", schema)
    ok(await run_cli("migrate", *common))
    line = one_line_error(await run_cli("provision", *common, "--kind", "worker", "--stream", "a,b"), "provision", 2)
    assert "invalid stream name" in line
    line = one_line_error(await run_cli("rotate", *common, "no_such_role"), "rotate", 1)
    assert "no_such_role" in line
    one_line_error(await run_cli("revoke", *common, "postgres"), "revoke", 1)  # never a role outside the schema

    # a worker's login is no admin: it can neither migrate nor provision, and says so in one line
    worker = json.loads(ok(await run_cli("provision", *common, "--kind", "worker", "--stream", "a", "--json")).stdout)
    as_worker = ("--dsn", pg_server.role_dsn(worker["role"], worker["password"]), "--schema", schema)
    line = one_line_error(await run_cli("provision", *as_worker, "--kind", "worker", "--stream", "b"), "provision", 1)
    assert worker["password"] not in line
    line = one_line_error(await run_cli("roles", *as_worker), "roles", 1)
    # a wrong password: refused, and the password is never echoed
    wrong = ("--dsn", pg_server.role_dsn(worker["role"], "not-the-password-x"), "--schema", schema)
    line = one_line_error(await run_cli("migrate", *wrong), "migrate", 1)
    assert "not-the-password-x" not in line and "refused the login" in line
    listed = json.loads(ok(await run_cli("roles", *common, "--json")).stdout)
    assert [r["role"] for r in listed] == [worker["role"]]  # nothing else was created


async def test_embedded_default_needs_no_dsn(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    try:
        done = ok(await run_cli("migrate", "--data-dir", str(data_dir), limit=110))
        assert "applied 1" in done.stderr
        assert (data_dir / "PG_VERSION").exists()
        # the data persists: the next run starts the same server again and finds the schema migrated
        assert "nothing to apply" in ok(await run_cli("migrate", "--data-dir", str(data_dir), limit=60)).stderr
    finally:
        stop_if_left_running(data_dir)
