"""Availability attacks by a scoped role (issue: tenant isolation), each made as the restricted role over TCP with
its password, each asserting that the victim (another stream's worker, a caller, an admin command) is unaffected
within a bound, and that the defence leaves the normal path alone.

The bounds are generous (a busy 2-core machine): a defence that works answers in well under a second; one that
does not hangs until the bound.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import anyio
import asyncpg
import pytest

from mcp_hotmesh import _admin as admin
from mcp_hotmesh._housekeeping import watchdog_loop
from mcp_hotmesh._roles import CONNECTION_LIMIT, ProvisionedRole, provision_role, revoke, rotate, set_limits
from mcp_hotmesh.errors import Busy, InvalidInput, PayloadTooLarge, QuotaExceeded
from tests.helpers import Env, wait_for

pytestmark = pytest.mark.anyio

BOUND = 20  # seconds: the most any victim may wait below (they answer at once when the defence works)
LOCK_TIMEOUT = "200ms"  # in place of the 1 s and 2 s the library and the SQL wait for a lock a role holds
TOOL = {"name": "t", "description": "a tool", "input_schema": {"type": "object"}}


async def ended(conn: asyncpg.Connection) -> bool:
    """Whether the server ended this session (the client sees it once it tries to use it)."""
    try:
        with anyio.fail_after(BOUND):
            await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, ConnectionError):
        return True
    return False


# ------------------------------------------------------------------------------------- locks held open

async def test_a_held_heartbeat_does_not_take_other_streams_workers_offline(env: Env) -> None:
    bad_role, _ = await env.worker(["alpha"])
    _, victim = await env.worker(["beta"])
    _, caller = await env.caller(["beta"])
    await victim.register_tool("beta", "", TOOL)
    # long-expired rows: every heartbeat's cleanup deletes them, so whoever deletes first holds them
    await env.admin.execute(
        f'INSERT INTO "{env.schema}".workers (stream, consumer, role_name, expires_at) '
        "SELECT 'beta', 'old' || i, 'x', now() - interval '2 hours' FROM generate_series(1, 5) i"
    )
    async with env.session(bad_role) as conn:
        await conn.execute("BEGIN")
        await conn.fetchval(f"SELECT \"{env.schema}\".worker_heartbeat(ARRAY['alpha'], 'a1', 60000)")
        # ... and the attacker keeps its transaction open
        with anyio.fail_after(BOUND):
            assert await victim.heartbeat(["beta"], "v1", 60_000) == 1
        [tool] = await caller.tools()
        assert tool.live_workers == 1


async def test_a_held_purge_does_not_stop_retention_of_other_streams(env: Env) -> None:
    bad_role, bad = await env.worker(["alpha"])
    _, worker = await env.worker(["beta"])
    _, caller = await env.caller(["beta"])
    await env.set("retention_ms", 0)
    call = await caller.call("beta", "", {}, 5_000)
    [msg] = await worker.dequeue("beta", "w", 1, 60_000)
    await worker.respond("beta", msg.id, msg.lease, {"ok": True})
    # done, and past its deadline: what retention deletes
    await env.admin.execute(f"UPDATE \"{env.schema}\".messages SET deadline = now() - interval '1 s'")
    async with env.session(bad_role) as conn:
        await conn.execute("BEGIN")
        await conn.fetchval(f'SELECT "{env.schema}".worker_purge()')
        with anyio.fail_after(BOUND):
            assert await caller.purge() == 1
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".messages WHERE call_id = $1', call) == 0
    assert bad is not None


async def test_a_row_a_caller_keeps_locked_costs_the_worker_a_bounded_wait(env: Env) -> None:
    """A caller can lock its own call (an uncommitted caller_cancel); the worker answering it waits for the
    scoped functions' lock_timeout, gets a retryable ``Busy``, and answers once the lock is gone. (The function's
    2 s is shortened in this test's schema: what is tested is that the wait ends, not how long it is.)"""
    await env.admin.execute(
        f'ALTER FUNCTION "{env.schema}".worker_respond(text, bigint, uuid, jsonb, boolean) '
        f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    caller_role, caller = await env.caller(["a"])
    _, worker = await env.worker(["a"])
    call = await caller.call("a", "", {}, 60_000)
    [msg] = await worker.dequeue("a", "w", 1, 60_000)
    async with env.session(caller_role) as conn:
        await conn.execute("BEGIN")
        await conn.fetchval(f'SELECT "{env.schema}".caller_cancel($1)', call)
        with anyio.fail_after(BOUND), pytest.raises(Busy):
            await worker.respond("a", msg.id, msg.lease, {"ok": True})
    with anyio.fail_after(BOUND):  # the attacker's session is gone: its lock with it
        assert await worker.respond("a", msg.id, msg.lease, {"ok": True})


# ----------------------------------------------------------------------------------- admin commands

@pytest.mark.parametrize("hold", ["own password", "open heartbeat"])
async def test_revoke_finishes_whatever_the_role_holds(env: Env, hold: str) -> None:
    role, worker = await env.worker(["a"])
    await worker.heartbeat(["a"], "w1", 60_000)
    async with env.session(role) as conn:
        await conn.execute("BEGIN")
        if hold == "own password":  # locks the role's own catalog row until the transaction ends
            await conn.execute("ALTER ROLE CURRENT_USER PASSWORD 'mine now'")
        else:  # locks its rows of the workers table
            await conn.fetchval(f"SELECT \"{env.schema}\".worker_heartbeat(ARRAY['a'], 'w1', 60000)")
        with anyio.fail_after(BOUND):
            count = await revoke(env.admin, role.role, schema=env.schema, lock_timeout=LOCK_TIMEOUT)
        assert count >= 1
        assert await ended(conn)
    assert not await env.admin.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", role.role)
    assert await env.admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role.role) == 0
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await env.connect(role)
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".workers WHERE role_name = $1',
                                    role.role) == 0


async def test_rotate_finishes_while_the_role_holds_its_own_row(env: Env) -> None:
    role = await env.provision(["a"], "worker")
    async with env.session(role) as conn:
        await conn.execute("BEGIN")
        await conn.execute("ALTER ROLE CURRENT_USER PASSWORD 'mine now'")
        with anyio.fail_after(BOUND):
            rotated = await rotate(env.admin, role.role, schema=env.schema, lock_timeout=LOCK_TIMEOUT)
        assert await ended(conn)
    new = await env.connect(rotated)
    await new.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await env.connect(role)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await env.connect(ProvisionedRole(role.role, "mine now", "worker", ["a"]))


async def test_rotate_ends_no_session_that_holds_nothing(env: Env) -> None:
    role = await env.provision(["a"], "worker")
    async with env.session(role) as idle:
        await rotate(env.admin, role.role, schema=env.schema)
        assert await idle.fetchval("SELECT 1") == 1  # a session open before keeps working


# --------------------------------------------------------------------------------- server resources

async def test_a_role_cannot_take_every_connection(env: Env) -> None:
    role = await provision_role(env.admin, ["a"], "worker", schema=env.schema, connection_limit=3)
    assert await env.admin.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", role.role) == 3
    default = await env.provision(["b"], "caller")
    assert await env.admin.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
                                    default.role) == CONNECTION_LIMIT
    held = [await env.connect(role) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await env.connect(role)
        victim = await env.connect(default)  # another role still gets in
        assert await victim.fetchval("SELECT 1") == 1
        await victim.close()
    finally:
        for conn in held:
            conn.terminate()


async def test_the_watchdog_ends_sessions_that_hold_a_transaction_open(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    await env.set("watchdog_idle_ms", 300)
    bad_role, _ = await env.caller(["a"])
    _, worker = await env.worker(["b"])
    polite_role = await env.provision(["b"], "caller")
    async with env.session(bad_role) as idle_in_tx, env.session(bad_role) as listener, \
            env.session(polite_role) as polite:
        await idle_in_tx.execute("BEGIN")
        await idle_in_tx.fetchval(f"SELECT count(*) FROM \"{env.schema}\".caller_tools()")
        # a listener inside a transaction keeps the server's NOTIFY queue from being freed, for everyone
        await listener.add_listener("anything", lambda *_: None)
        await listener.execute("BEGIN")
        await polite.fetchval("SELECT 1")  # idle, not in a transaction: left alone
        await env.admin.execute("BEGIN")  # the admin is never ended
        try:
            await anyio.sleep(0.6)  # past watchdog_idle_ms for all of them: the polite one is left alone all the same
            with caplog.at_level(logging.WARNING, logger="mcp_hotmesh._housekeeping"):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: watchdog_loop(worker, interval=0.1))
                    with anyio.fail_after(BOUND):
                        while len([r for r in caplog.records if "watchdog: ended session" in r.message]) < 2:  # noqa: ASYNC110 (a log)
                            await anyio.sleep(0.05)
                    tg.cancel_scope.cancel()
        finally:
            await env.admin.execute("ROLLBACK")
        assert await ended(idle_in_tx) and await ended(listener)
        assert await polite.fetchval("SELECT 1") == 1
        assert all(bad_role.role in r.message for r in caplog.records if "watchdog: ended" in r.message)
    # a long transaction that is busy, not idle, is ended too, past watchdog_transaction_ms
    await env.set("watchdog_transaction_ms", 300)
    async with env.session(bad_role) as busy:
        await busy.execute("BEGIN")
        sleeping = busy.execute("SELECT pg_sleep(60)")
        async with anyio.create_task_group() as tg:
            async def sleep_then_fail() -> None:
                with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
                    await sleeping
            tg.start_soon(sleep_then_fail)
            with anyio.fail_after(BOUND):
                while not [e for e in await worker.watchdog()  # noqa: ASYNC110
                           if e.role == bad_role.role]:
                    await anyio.sleep(0.1)  # (the server's state: no event to wait on)


async def test_the_watchdog_is_only_for_scoped_roles_with_streams(env: Env) -> None:
    role = await env.provision(["a"], "worker")
    await env.admin.execute(f'ALTER ROLE "{role.role}" IN DATABASE "{env.server.database}" RESET app.allowed_streams')
    async with env.session(role) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f'SELECT * FROM "{env.schema}".worker_watchdog()')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a worker runs the worker's, not the caller's
            await conn.fetch(f'SELECT * FROM "{env.schema}".caller_watchdog()')


# ---------------------------------------------------------------------------------------------- quotas

async def test_queue_quotas_per_role_and_stream(env: Env) -> None:
    greedy_role, greedy = await env.caller(["q"])
    _, other = await env.caller(["q"])
    limits = await set_limits(env.admin, greedy_role.role, schema=env.schema, max_queued=3)
    assert (limits.max_queued, limits.max_queued_bytes) == (3, 1 << 30)
    for i in range(3):
        await greedy.call("q", "", {"i": i}, 60_000)
    before = await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".messages')
    with pytest.raises(QuotaExceeded, match="at most 3 messages"):
        await greedy.call("q", "", {"i": 3}, 60_000)
    with pytest.raises(QuotaExceeded):
        await greedy.call_many([("q", "", {"i": 4}, 60_000)])
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".messages') == before  # nothing written
    await other.call_many([("q", "", {"i": i}, 60_000) for i in range(5)])  # another role: its own quota
    # bytes
    await set_limits(env.admin, greedy_role.role, schema=env.schema, max_queued=-1, max_queued_bytes=2000)
    with pytest.raises(QuotaExceeded, match="bytes"):
        await greedy.call("q", "", {"text": "x" * 5000}, 60_000)
    # claimed calls no longer count
    _, worker = await env.worker(["q"])
    await worker.dequeue("q", "w", 100, 60_000)
    await set_limits(env.admin, greedy_role.role, schema=env.schema, max_queued=1, max_queued_bytes=-1)
    await greedy.call("q", "", {"i": 5}, 60_000)


async def test_fire_and_forget_messages_have_a_quota_too(env: Env) -> None:
    _, worker = await env.worker(["p"])
    await env.set("max_queued_messages", 2)
    await worker.publish("p", "job", {})
    await worker.publish("p", "job", {})
    with pytest.raises(QuotaExceeded):
        await worker.publish("p", "job", {})


# ---------------------------------------------------------------------------- hostile registrations

def nested(depth: int) -> Any:
    value: Any = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"x": value}}
    return value


@pytest.mark.parametrize(("tool", "error", "says"), [
    ({**TOOL, "input_schema": nested(20)}, PayloadTooLarge, "nested deeper than 32"),
    ({**TOOL, "input_schema": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}},
     PayloadTooLarge, "more than 10000 values"),
    ({**TOOL, "description": "d" * 10_001}, InvalidInput, "description longer than 10000"),
    ({**TOOL, "input_schema": {"type": "object", "maximum": int("9" * 500)}}, InvalidInput, "number longer"),
    ({**TOOL, "input_schema": {"type": "object", "properties": {"x": {"$ref": "file:///etc/passwd"}}}},
     InvalidInput, "$ref"),
    ({**TOOL, "input_schema": {"type": "object", "properties": {"x": {"$ref": "http://127.0.0.1:9/s.json"}}}},
     InvalidInput, "$ref"),
    ({**TOOL, "input_schema": {"type": "object", "$dynamicRef": "https://example.com/x"}}, InvalidInput, "$ref"),
    ({**TOOL, "input_schema": {"type": "object", "properties": {"x": {"$ref": 7}}}}, InvalidInput, "$ref"),
])
async def test_hostile_registrations_are_refused_with_the_rule(
    env: Env, tool: dict[str, Any], error: type[Exception], says: str
) -> None:
    _, worker = await env.worker(["a"])
    with pytest.raises(error, match=f".*{says.replace('$', '[$]')}"):
        await worker.register_tool("a", "", tool)
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".tools') == 0


async def test_reasonable_schemas_still_register(env: Env) -> None:
    _, worker = await env.worker(["a"])
    schema = {"type": "object", "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string"}}}},
              "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}, "n": {"maximum": 1e10}}}
    assert await worker.register_tool("a", "", {**TOOL, "input_schema": schema, "description": "d" * 5000})


async def test_lookalike_and_squatted_names_are_refused(env: Env) -> None:
    _, alpha = await env.worker(["alpha"])
    _, beta = await env.worker(["beta"])
    await alpha.register_tool("alpha", "", {**TOOL, "name": "get_weather"})
    for lookalike in ["get_weather", "Get_Weather", "get-weather", "GET-WEATHER"]:
        with pytest.raises(InvalidInput, match="another stream"):
            await beta.register_tool("beta", "", {**TOOL, "name": lookalike})
    await alpha.register_tool("alpha", "", {**TOOL, "name": "get-weather"})  # its own tool may be renamed so


async def test_a_stream_registers_a_bounded_number_of_tools(env: Env) -> None:
    _, worker = await env.worker(["a"])
    await env.set("max_tools_per_stream", 3)
    for i in range(3):
        await worker.register_tool("a", f"w{i}", {**TOOL, "name": f"t{i}"})
    with pytest.raises(InvalidInput, match="already has 3 tools"):
        await worker.register_tool("a", "w3", {**TOOL, "name": "t3"})
    assert await worker.register_tool("a", "w0", {**TOOL, "name": "t0", "description": "changed"})  # an update


# ------------------------------------------------------------------------------- values read by others

async def test_arguments_and_results_are_bounded_in_depth(env: Env) -> None:
    _, caller = await env.caller(["a"])
    _, worker = await env.worker(["a"])
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    with pytest.raises(PayloadTooLarge, match="nested deeper than 128"):
        await caller.call("a", "", {"x": deep}, 60_000)
    with pytest.raises(PayloadTooLarge):
        await caller.call_many([("a", "", {"x": deep}, 60_000)])
    with pytest.raises(PayloadTooLarge):
        await worker.publish("a", "job", {"x": deep})
    await caller.call("a", "", {"x": json.loads("[" * 120 + "]" * 120)}, 60_000)  # within the bound
    [msg] = await worker.dequeue("a", "w", 1, 60_000)
    with pytest.raises(PayloadTooLarge):
        await worker.respond("a", msg.id, msg.lease, {"x": deep})
    from mcp_hotmesh._streams import Answer
    with pytest.raises(PayloadTooLarge):
        await worker.respond_and_dequeue("a", "w", [Answer(msg.id, msg.lease, {"x": deep})], 0, 60_000)
    for progress, total in [(float("nan"), None), (float("inf"), None), (1.0, float("-inf"))]:
        with pytest.raises(InvalidInput, match="finite"):
            await worker.progress("a", msg.id, msg.lease, progress, total, "x")
    assert await worker.respond("a", msg.id, msg.lease, {"ok": True})


# ------------------------------------------------------------------------- the server as a whole

@pytest.mark.skipif(bool(os.environ.get("HOTMESH_TEST_DSN")), reason="the embedded server's own database")
async def test_the_embedded_database_gives_roles_nothing_to_exhaust_the_server_with(env: Env) -> None:
    role = await env.provision(["a"], "worker")
    async with env.session(role) as conn:
        for statement in (
            "CREATE TEMP TABLE filler AS SELECT 1",  # disk, with no quota
            "SELECT lo_from_bytea(0, 'x'::bytea)",  # large objects: disk, and they outlive the session
            "SELECT lo_create(0)",
            "SELECT pg_advisory_lock(g) FROM generate_series(1, 100000) g",  # the server's shared lock table
            "SELECT pg_try_advisory_xact_lock(1)",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)


async def test_the_watchdog_ends_a_session_holding_advisory_locks(env: Env) -> None:
    bad_role = await env.provision(["a"], "caller")
    _, worker = await env.worker(["b"])
    # where the server allows it (the embedded one does not), a role may take advisory locks: grant it here
    await env.admin.execute(f'GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO "{bad_role.role}"')
    try:
        async with env.session(bad_role) as conn:
            await conn.execute("SELECT pg_advisory_lock(42)")  # outside any transaction: only the lock stays
            with anyio.fail_after(BOUND):
                [gone] = await worker.watchdog()
            assert (gone.role, gone.reason) == (bad_role.role, "an advisory lock held")
            assert await ended(conn)
    finally:
        await env.admin.execute(f'REVOKE EXECUTE ON FUNCTION pg_advisory_lock(bigint) FROM "{bad_role.role}"')


async def test_a_role_announces_a_bounded_number_of_consumers(env: Env) -> None:
    _, worker = await env.worker(["a"])
    await env.set("max_consumers_per_stream", 3)
    for i in range(3):
        await worker.heartbeat(["a"], f"c{i}", 60_000)
    with pytest.raises(QuotaExceeded, match="consumers"):
        await worker.heartbeat(["a"], "c3", 60_000)
    assert await worker.heartbeat(["a"], "c0", 60_000) == 1  # a known consumer keeps beating


async def test_a_dead_call_its_caller_keeps_locked_does_not_stall_the_dlq_purge(env: Env) -> None:
    caller_role, caller = await env.caller(["a"])
    _, worker = await env.worker(["a"])
    calls = [await caller.call("a", "", {"i": i}, 60_000) for i in range(3)]
    for msg in await worker.dequeue("a", "w", 3, 5_000):
        assert await worker.fail("a", msg.id, msg.lease, "broken", None)  # no retry: dead-lettered
    async with env.session(caller_role) as conn:
        await conn.execute("BEGIN")
        await conn.fetchval(f'SELECT "{env.schema}".caller_cancel($1)', calls[0])  # holds its own dead row
        with anyio.fail_after(BOUND):
            assert await admin.dlq_purge(env.admin, env.schema, admin.DlqFilter(stream="a")) == 2
    assert await admin.dlq_purge(env.admin, env.schema, admin.DlqFilter(stream="a")) == 1


# ------------------------------------------------------------------------- NULL and extreme arguments

EXTREMES: list[Any] = [None, 0, -1, 2**31 - 1, -(2**31), "", "x" * 100_000, "a\tb", "ü", "#", "%s"]


async def test_null_and_extreme_arguments_fail_cleanly_and_touch_nothing_else(env: Env) -> None:
    """Every scoped function, called by its own kind with NULL or an extreme value in each argument in turn:
    a result or one of the errors the API defines (never an internal error, never a hang), and another
    stream's message and tool are just as they were."""
    worker_role = await env.provision(["a"], "worker")
    caller_role = await env.provision(["a"], "caller")
    _, victim_worker = await env.worker(["v"])
    _, victim_caller = await env.caller(["v"])
    await victim_worker.register_tool("v", "", {**TOOL, "name": "victim"})
    victim_call = await victim_caller.call("v", "", {"keep": True}, 60_000)
    before = await env.admin.fetch(f'SELECT * FROM "{env.schema}".messages WHERE stream = $1', "v")
    signatures = await env.admin.fetch(
        "SELECT p.proname, p.oid::regprocedure::text AS sig, "
        "array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t) AS types "
        "FROM pg_proc p WHERE p.pronamespace = $1::regnamespace AND p.proname ~ '^(worker|caller)_' "
        "AND p.proname NOT LIKE '%watchdog'",
        env.schema,
    )
    assert len(signatures) >= 20
    samples = {"text": EXTREMES, "integer": EXTREMES, "bigint": EXTREMES, "uuid": [None, "0" * 8 + "-0000-0000-0000-"
               + "0" * 12], "jsonb": [None, "null", "[]", '"x"', "1e400", "{}"], "boolean": [None, True],
               "double precision": [None, "NaN", "Infinity", "-1e308", 0]}
    allowed = ("42501", "HM", "22", "23505", "55P03", "54")  # denied, ours, bad value, duplicate, busy, too large
    reached = 0  # calls the server ran (answered or refused): the test must not pass by sending nothing
    async with env.session(worker_role) as as_worker, env.session(caller_role) as as_caller:
        for row in signatures:
            conn = as_worker if row["proname"].startswith("worker_") else as_caller
            types: list[str] = list(row["types"])
            base: list[Any] = [_ordinary(t) for t in types]
            for i, kind in enumerate(types):
                for value in samples.get(kind.removesuffix("[]"), [None]) if not kind.endswith("[]") else [None, []]:
                    args = list(base)
                    args[i] = _cast(value, kind)
                    placeholders = ", ".join(f"${n + 1}::{t}" for n, t in enumerate(types))
                    try:
                        with anyio.fail_after(BOUND):
                            await conn.fetch(f'SELECT * FROM "{env.schema}".{row["proname"]}({placeholders})', *args)
                        reached += 1
                    except asyncpg.PostgresError as exc:
                        reached += 1
                        assert (exc.sqlstate or "").startswith(allowed), (row["sig"], i, value, exc.sqlstate, exc)
                    except (asyncpg.DataError, OverflowError, ValueError):
                        pass  # the driver refused to send it: nothing reached the server
    assert reached > 300, reached
    after = await env.admin.fetch(f'SELECT * FROM "{env.schema}".messages WHERE stream = $1', "v")
    assert [dict(r) for r in after] == [dict(r) for r in before]
    assert [t.name for t in await victim_caller.tools()] == ["victim"]
    assert (await victim_caller.result(victim_call)).state == "ready"


def _ordinary(kind: str) -> Any:
    """A well-formed value of ``kind`` for the arguments not under test."""
    return {"text": "a", "integer": 1000, "bigint": 1, "uuid": "00000000-0000-0000-0000-000000000000",
            "jsonb": "{}", "boolean": False, "double precision": 1.0, "text[]": ["a"], "bigint[]": [], "uuid[]": [],
            "jsonb[]": [], "boolean[]": [], "integer[]": []}.get(kind)


def _cast(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind.endswith("[]"):
        return value
    if kind in ("integer", "bigint"):
        return value if isinstance(value, int) else None
    if kind == "double precision":
        return float(value)
    if kind == "boolean":
        return bool(value)
    if kind == "uuid":
        return value if len(str(value)) == 36 else None
    return str(value)


async def test_a_worker_changing_its_tool_in_a_loop_does_not_flood_the_gateway_or_its_clients(env: Env) -> None:
    from mcp_hotmesh._caller import REFRESH_MIN_INTERVAL, Engine

    _, worker = await env.worker(["a"])
    caller_role = await env.provision(["a"], "caller")
    engine = Engine(await env.pool(caller_role), schema=env.schema, role=caller_role.role,
                    listen_dsn=env.dsn(caller_role))
    told = 0

    async def tools_changed() -> None:
        nonlocal told
        told += 1

    engine.on_tools_changed = tools_changed
    async with engine:
        started = anyio.current_time()
        for i in range(200):
            await worker.register_tool("a", "", {**TOOL, "description": f"version {i}"})

        async def caught_up() -> bool:  # the last version is what is listed, and the clients were told
            return told >= 1 and [t.description for t in engine.tools()] == ["version 199"]

        await wait_for(caught_up, BOUND)
        elapsed = anyio.current_time() - started
        # one refresh per interval at most
        assert told <= elapsed / REFRESH_MIN_INTERVAL + 2, (told, elapsed)
