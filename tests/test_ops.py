"""Operations: ``status``, ``dlq``, retention, ``/metrics`` and JSON logs, in-process and through the real CLI.

Messages are put in each state through the API functions, as workers and callers would; the numbers the
operator sees are then checked against them.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import anyio
import asyncpg
import pytest
from mcp import Client, MCPError

from mcp_hotmesh import _admin as admin
from mcp_hotmesh import _format as fmt
from mcp_hotmesh._housekeeping import retention_loop
from mcp_hotmesh._streams import CallerAPI, CallResult, Claimed, WorkerAPI
from mcp_hotmesh.errors import ConfigError, NotFound
from tests.helpers import (
    TOKEN,
    Env,
    Hub,
    http_client,
    hub_for,
    ok,
    one_line_error,
    run_cli,
    stop_if_left_running,
    wait_for,
)

pytestmark = pytest.mark.anyio


async def one_of_each(env: Env) -> tuple[WorkerAPI, CallerAPI, dict[str, UUID]]:
    """On stream ops.a: one message in each state; on ops.b: a fire-and-forget message. Returns the call ids."""
    _, worker = await env.worker(["ops.a", "ops.b"])
    _, caller = await env.caller(["ops.a", "ops.b"])
    await worker.register_tool("ops.a", "", {"name": "ops_a", "description": "a", "input_schema": {"type": "object"}})
    await worker.heartbeat(["ops.a"], "w1", 60_000)
    ids: dict[str, UUID] = {}

    async def claim(lease_ms: int = 60_000) -> Claimed:
        [msg] = await worker.dequeue("ops.a", "w1", 1, lease_ms)
        return msg

    ids["done"] = await caller.call("ops.a", "", {"n": "done"}, 60_000)
    msg = await claim()
    assert await worker.respond("ops.a", msg.id, msg.lease, {"ok": True})
    ids["dead"] = await caller.call("ops.a", "", {"n": "dead"}, 60_000)
    msg = await claim()
    assert await worker.fail("ops.a", msg.id, msg.lease, "it broke", None)
    ids["retrying"] = await caller.call("ops.a", "", {"n": "retrying"}, 60_000)
    msg = await claim()
    assert await worker.fail("ops.a", msg.id, msg.lease, "try later", 10_000)
    ids["stalled"] = await caller.call("ops.a", "", {"n": "stalled"}, 60_000)
    await claim(lease_ms=50)
    ids["in_flight"] = await caller.call("ops.a", "", {"n": "in_flight"}, 60_000)
    await claim()
    ids["ready"] = await caller.call("ops.a", "", {"n": "ready"}, 60_000)
    await worker.publish("ops.b", "job", {"n": "published"})
    await anyio.sleep(0.1)  # the 50 ms lease expires
    return worker, caller, ids


# ---------------------------------------------------------------------------------------------- status
async def test_status_counts_every_state(env: Env) -> None:
    await one_of_each(env)
    st = await admin.status(env.admin, env.schema)
    a, b = st.streams
    assert (a.stream, a.tools, a.live_workers) == ("ops.a", ["ops_a"], 1)
    assert (a.ready, a.in_flight, a.stalled, a.retrying, a.dead, a.done) == (1, 1, 1, 1, 1, 1)
    assert a.oldest_waiting_seconds is not None and 0 <= a.oldest_waiting_seconds < 30
    assert a.calls_per_second == round(2 / 60, 3)  # one done, one dead in the last minute
    assert (b.stream, b.tools, b.ready, b.live_workers, b.dead) == ("ops.b", [], 1, 0, 0)
    data = st.as_json()
    assert set(data) == {"schema", "time", "streams", "totals", "retention", "roles", "pending_tools"}
    # per role: the caller's two calls waiting (one ready, one retrying later), none of the worker's
    assert sorted((r["kind"], r["queued"]) for r in data["roles"]) == [("caller", 2), ("worker", 0)]
    assert set(data["streams"][0]) == {"stream", "tools", "ready", "in_flight", "stalled", "retrying", "dead", "done",
                                       "oldest_waiting_seconds", "live_workers", "calls_per_second"}
    assert data["totals"]["ready"] == 2 and data["retention"]["done_seconds"] == 3600
    text = fmt.format_status(st)
    assert text.splitlines()[1].split()[:3] == ["STREAM", "TOOLS", "READY"]
    assert "ops.b: 1 message(s) waiting and no live worker" in text
    assert "ops.a: 1 message(s) held by a worker that stopped responding" in text
    assert "ops.a: 1 dead message(s): mcp-hotmesh dlq list --stream ops.a" in text


async def test_status_of_an_empty_schema(env: Env) -> None:
    st = await admin.status(env.admin, env.schema)
    assert st.streams == [] and st.last_purge is None
    assert "no streams yet" in fmt.format_status(st)


# ------------------------------------------------------------------------------------------------- dlq
async def test_dlq_retry_in_place_answers_the_caller_that_still_waits(env: Env) -> None:
    worker, caller, ids = await one_of_each(env)
    [dead] = await admin.dlq_list(env.admin, env.schema, admin.DlqFilter())
    assert (dead.stream, dead.call_id, dead.error, dead.args) == ("ops.a", ids["dead"], "it broke", {"n": "dead"})
    assert (await caller.result(ids["dead"])).state == "dead"

    async def waiting_caller() -> CallResult:  # a caller that keeps asking for its call, as caller_result allows
        with anyio.fail_after(10):
            while (result := await caller.result(ids["dead"])).state != "done":  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return result

    [retried] = await admin.dlq_retry(env.admin, env.schema, admin.DlqFilter(ids=[dead.id]),
                                    deadline_in=timedelta(seconds=30))
    assert (retried.id, retried.new_id, retried.call_id) == (dead.id, dead.id, ids["dead"])
    row = await env.message(dead.id)
    assert (row["state"], row["attempt"], row["reclaims"], row["error"], row["result"]) == ("ready", 0, 0, None, None)
    assert 25 < (row["deadline"] - await env.admin.fetchval("SELECT now()")).total_seconds() <= 30
    assert await admin.dlq_list(env.admin, env.schema, admin.DlqFilter()) == []
    async with anyio.create_task_group() as tg:
        got: list[CallResult] = []

        async def wait() -> None:
            got.append(await waiting_caller())

        tg.start_soon(wait)
        msgs = await worker.dequeue("ops.a", "w1", 10, 60_000)
        msg = next(m for m in msgs if m.id == dead.id)
        assert await worker.respond("ops.a", msg.id, msg.lease, {"second": "time"})
    assert got[0].state == "done" and got[0].result == {"second": "time"}


async def test_dlq_retry_as_a_new_publish_and_purge_with_filters(env: Env) -> None:
    worker, _, ids = await one_of_each(env)
    [msg] = await worker.dequeue("ops.b", "w1", 1, 60_000)
    assert await worker.fail("ops.b", msg.id, msg.lease, "no luck", None)  # the published message dies too
    everything = await admin.dlq_list(env.admin, env.schema, admin.DlqFilter())
    assert [m.stream for m in everything] == ["ops.a", "ops.b"]
    assert [m.id for m in await admin.dlq_list(env.admin, env.schema, admin.DlqFilter(stream="ops.b"))] == [msg.id]
    assert await admin.dlq_list(env.admin, env.schema, admin.DlqFilter(older_than=timedelta(hours=1))) == []
    assert len(await admin.dlq_list(env.admin, env.schema, admin.DlqFilter(newer_than=timedelta(hours=1)))) == 2
    assert len(await admin.dlq_list(env.admin, env.schema, admin.DlqFilter(limit=1))) == 1

    [retried] = await admin.dlq_retry(env.admin, env.schema, admin.DlqFilter(stream="ops.a"), publish=True)
    assert retried.new_id != retried.id and retried.call_id == ids["dead"]
    new = await env.message(retried.new_id)
    assert (new["state"], new["call_id"], new["deadline"], new["args"]) == ("ready", None, None, '{"n": "dead"}')
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".messages WHERE id = $1', retried.id) == 0

    # a published message is retried in place and stays fire-and-forget
    [again] = await admin.dlq_retry(env.admin, env.schema, admin.DlqFilter(ids=[msg.id]))
    assert again.new_id == msg.id and (await env.message(msg.id))["deadline"] is None
    [msg] = await worker.dequeue("ops.b", "w1", 1, 60_000)
    assert await worker.fail("ops.b", msg.id, msg.lease, "no luck", None)

    assert await admin.dlq_purge(env.admin, env.schema, admin.DlqFilter(older_than=timedelta(hours=1))) == 0
    assert await admin.dlq_purge(env.admin, env.schema, admin.DlqFilter(stream="ops.b")) == 1
    assert await admin.dlq_list(env.admin, env.schema, admin.DlqFilter()) == []
    with pytest.raises(NotFound, match="no dead message with id"):
        await admin.dlq_show(env.admin, env.schema, msg.id)
    with pytest.raises(ConfigError, match="invalid stream name"):
        admin.DlqFilter(stream="a,b")


def test_durations() -> None:
    assert fmt.parse_duration("90") == timedelta(seconds=90)
    assert fmt.parse_duration("1h30m") == timedelta(minutes=90)
    assert fmt.parse_duration("500ms") == timedelta(milliseconds=500)
    assert fmt.parse_duration("7d") == timedelta(days=7)
    for bad in ("", "h", "1x", "-1s", "1h 2", "1.5.5s"):
        if bad == "1h 2":
            assert fmt.parse_duration(bad) == timedelta(hours=1, seconds=2)
            continue
        with pytest.raises(ConfigError):
            fmt.parse_duration(bad)
    assert fmt.format_age(None) == "-" and fmt.format_age(3.25) == "3.2s" and fmt.format_age(185) == "3m05s"
    assert fmt.format_age(0.05) == "50ms" and fmt.format_age(90_000) == "1d1h"


# ------------------------------------------------------------------------------------------- retention
async def done_call(worker: WorkerAPI, caller: CallerAPI, stream: str, timeout_ms: int) -> UUID:
    call_id = await caller.call(stream, "", {}, timeout_ms)
    [msg] = await worker.dequeue(stream, "w", 1, 60_000)
    assert await worker.respond(stream, msg.id, msg.lease, {})
    return call_id


async def test_purge_keeps_what_a_caller_may_still_read_and_each_role_its_own_streams(env: Env) -> None:
    await env.set("retention_ms", 0)
    worker_role, worker = await env.worker(["r.a", "r.b"])
    _, caller_a = await env.caller(["r.a"])
    purging_worker = WorkerAPI(await env.pool(await env.provision(["r.a"], "worker")), env.schema)
    expired = [await done_call(worker, caller_a, "r.a", 200) for _ in range(3)]
    waited_for = await done_call(worker, caller_a, "r.a", 60_000)  # done, but its caller may still read it
    _, caller_b = await env.caller(["r.b"])
    other_stream = await done_call(worker, caller_b, "r.b", 200)
    await worker.publish("r.a", "", {})
    [msg] = await worker.dequeue("r.a", "w", 1, 60_000)
    assert await worker.fail("r.a", msg.id, msg.lease, "dead", None)  # dead: kept for the dlq
    await worker.publish("r.a", "", {})  # ready: never purged
    await anyio.sleep(0.3)  # the short deadlines pass

    await env.set("purge_batch", 2)
    assert await purging_worker.purge() == 2  # bounded
    assert await caller_a.purge() == 1
    assert await caller_a.purge() == 0
    rows = await env.admin.fetch(f'SELECT call_id, state FROM "{env.schema}".messages ORDER BY id')
    states = {r["call_id"]: r["state"] for r in rows}
    assert not set(expired) & set(states)
    assert states[waited_for] == "done" and states[other_stream] == "done"  # not r.a's; the caller still may read
    assert [r["state"] for r in rows] == ["done", "done", "dead", "ready"]
    assert (await caller_a.result(waited_for)).result == {}

    # the admin purges every stream; a dead message only once dead_retention_ms is set
    assert await WorkerAPI(env.admin, env.schema).purge() == 1
    await env.set("dead_retention_ms", 1)
    assert await CallerAPI(env.admin, env.schema).purge() == 1
    left = await env.admin.fetch(f'SELECT call_id, state FROM "{env.schema}".messages ORDER BY id')
    assert [(r["call_id"], r["state"]) for r in left] == [(waited_for, "done"), (None, "ready")]
    st = await admin.status(env.admin, env.schema)
    assert st.last_purge is not None and st.dead_retention_seconds == 0.001
    assert worker_role.role


async def test_the_purge_lock_is_one_no_scoped_role_can_hold(env: Env) -> None:
    worker_role, worker = await env.worker(["r.a"])
    _, caller = await env.caller(["r.a"])
    stranger = await env.connect(worker_role)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the row lock needs UPDATE on settings
            await stranger.execute(f"SELECT * FROM \"{env.schema}\".settings WHERE key = 'purge_lock' FOR UPDATE")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):  # refused outright by the embedded server
            await stranger.execute("SELECT pg_advisory_lock(hashtext('purge'))")  # advisory locks: nothing to us
        assert await caller.purge() == 0
    finally:
        await stranger.close()
    async with env.admin.transaction():  # whoever holds the row, a purge neither waits nor steps aside
        await env.admin.execute(f"SELECT * FROM \"{env.schema}\".settings WHERE key = 'purge_lock' FOR UPDATE")
        with anyio.fail_after(5):
            assert await worker.purge() == 0


@pytest.mark.slow  # 600 calls
async def test_the_table_stays_bounded_over_many_calls(env: Env) -> None:
    """Calls through the gateway, with the gateway's retention loop running: done rows go once their deadline
    has passed, so the table holds about one deadline's worth of calls, however many were made."""
    await env.set("retention_ms", 0)
    async with hub_for(env, call_timeout=0.4) as hub, Client(hub.gateway.server) as client, \
            anyio.create_task_group() as tg:
        tg.start_soon(lambda: retention_loop(hub.engine.api, interval=0.1))
        most = 0
        for round_ in range(12):
            async with anyio.create_task_group() as calls:
                for i in range(50):
                    calls.start_soon(client.call_tool, "echo", {"text": f"{round_}-{i}"})
            most = max(most, await hub.rows())
            await anyio.sleep(0.15)

        async def emptied() -> bool:
            return await hub.rows() == 0

        await wait_for(emptied, 10)
        tg.cancel_scope.cancel()
    assert 0 < most <= 300, most  # 600 calls made; never more than about half of them kept


# --------------------------------------------------------------------------------------------- metrics
async def test_metrics_in_prometheus_text(http_hub: tuple[Hub, str]) -> None:
    hub, url = http_hub
    async with Client(hub.gateway.server) as client:
        assert not (await client.call_tool("echo", {"text": "hi"})).is_error
        assert (await client.call_tool("echo", {"text": 5})).is_error
        assert (await client.call_tool("test_fail", {"reason": "broken"})).is_error
        with pytest.raises(MCPError):
            await client.call_tool("no_such_tool\n\"{}", {})
    async with http_client(None) as http:
        assert (await http.get(f"{url}/metrics")).status_code == 401
    async with http_client("wrong-token-but-long-enough") as http:
        assert (await http.get(f"{url}/metrics")).status_code == 401
    async with http_client(TOKEN) as http:
        response = await http.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? [-+0-9.eInf]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert 'hotmesh_tool_calls_total{tool="echo",outcome="ok"} 1' in text
    assert 'hotmesh_tool_calls_total{tool="echo",outcome="invalid_arguments"} 1' in text
    assert 'hotmesh_tool_calls_total{tool="test_fail",outcome="error"} 1' in text
    assert 'hotmesh_tool_calls_total{tool="(unknown)",outcome="unknown_tool"} 1' in text
    assert 'hotmesh_tool_call_duration_seconds_bucket{tool="echo",le="+Inf"} 2' in text
    assert 'hotmesh_tool_call_duration_seconds_count{tool="echo"} 2' in text
    assert 'hotmesh_dead_letters{stream="test.fail"} 1' in text
    assert 'hotmesh_queue_ready{stream="echo"} 0' in text
    assert 'hotmesh_live_workers{stream="echo"} 1' in text
    assert "hotmesh_database_up 1" in text


# ---------------------------------------------------------------------------------------- the real CLI
@pytest.mark.slow  # the real CLI, about twenty times
async def test_status_and_dlq_commands(env: Env) -> None:
    _, _, ids = await one_of_each(env)
    common = ("--dsn", env.server.admin_dsn, "--schema", env.schema)
    table = ok(await run_cli("status", *common)).stdout
    assert table.splitlines()[1].split() == ["STREAM", "TOOLS", "READY", "IN", "FLIGHT", "STALLED", "RETRYING",
                                             "DEAD", "OLDEST", "WAITING", "WORKERS", "CALLS/S"]
    assert re.search(r"^ops\.a\s+ops_a\s+1\s+1\s+1\s+1\s+1\s", table, re.MULTILINE), table
    data = json.loads(ok(await run_cli("status", *common, "--json")).stdout)
    assert [s["stream"] for s in data["streams"]] == ["ops.a", "ops.b"]
    watched = ok(await run_cli("status", *common, "--json", "--watch", "--interval", "0.1", "--count", "2")).stdout
    assert [json.loads(line)["schema"] for line in watched.splitlines()] == [env.schema, env.schema]

    listed = json.loads(ok(await run_cli("dlq", "list", *common, "--json")).stdout)
    assert [(m["stream"], m["call_id"], m["error"]) for m in listed] == [("ops.a", str(ids["dead"]), "it broke")]
    dead_id = str(listed[0]["id"])
    assert "it broke" in ok(await run_cli("dlq", "list", *common, "--stream", "ops.a")).stdout
    assert "empty" in ok(await run_cli("dlq", "list", *common, "--older-than", "1h")).stdout
    shown = json.loads(ok(await run_cli("dlq", "show", *common, dead_id, "--json")).stdout)
    assert shown["args"] == {"n": "dead"} and shown["id"] == listed[0]["id"]
    assert '"n": "dead"' in ok(await run_cli("dlq", "show", *common, dead_id)).stdout
    line = one_line_error(await run_cli("dlq", "retry", *common), "dlq retry", 2)
    assert "say which dead messages to retry" in line
    one_line_error(await run_cli("dlq", "show", *common, "99999999"), "dlq show", 1)  # not found: no usage error
    one_line_error(await run_cli("dlq", "list", *common, "--older-than", "soon"), "dlq list", 2)
    retried = json.loads(ok(await run_cli("dlq", "retry", *common, dead_id, "--timeout", "30s", "--json")).stdout)
    assert retried == [{"id": int(dead_id), "stream": "ops.a", "call_id": str(ids["dead"]), "new_id": int(dead_id)}]
    assert (await env.message(int(dead_id)))["state"] == "ready"
    await env.admin.execute(f"UPDATE \"{env.schema}\".messages SET state = 'dead', finished_at = now() "
                            "WHERE id = $1", int(dead_id))
    assert "purged 1 dead message(s)" in ok(await run_cli("dlq", "purge", *common, "--all")).stdout
    assert json.loads(ok(await run_cli("dlq", "list", *common, "--json")).stdout) == []

    shown = ok(await run_cli("settings", *common)).stdout
    assert re.search(r"^retention_ms\s+3600000  \(1h00m\)$", shown, re.MULTILINE), shown
    assert "purge_lock" not in shown
    changed = json.loads(ok(await run_cli("settings", *common, "retention_ms=2h", "purge_batch=100", "--json")).stdout)
    assert (changed["retention_ms"], changed["purge_batch"]) == (7_200_000, 100)
    assert (await admin.status(env.admin, env.schema)).retention_seconds == 7200
    one_line_error(await run_cli("settings", *common, "purge_lock=1"), "settings", 2)
    one_line_error(await run_cli("settings", *common, "min_lease_ms=2h"), "settings", 2)
    one_line_error(await run_cli("settings", *common, "retention_ms"), "settings", 2)


@pytest.mark.slow  # the real CLI, ten times
async def test_json_logs_for_every_command(env: Env) -> None:
    common = ("--dsn", env.server.admin_dsn, "--schema", env.schema, "--log-format", "json")
    done = ok(await run_cli("migrate", *common))
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("up to date" in r["message"] for r in records)
    failed = await run_cli("dlq", "purge", *common)
    assert failed.returncode == 2 and failed.stdout == ""
    [error] = [json.loads(line) for line in failed.stderr.splitlines()]
    assert error["level"] == "ERROR" and error["message"].startswith("mcp-hotmesh dlq purge: error: say which")
    for command in (["serve"], ["worker"], ["sql"], ["status"], ["dlq", "list"], ["roles"], ["provision"]):
        assert "--log-format" in ok(await run_cli(*command, "--help")).stdout, command


@pytest.mark.slow  # the real CLI, starting its own server
async def test_status_and_dlq_against_the_embedded_default(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    try:
        data = json.loads(ok(await run_cli("status", "--json", "--data-dir", str(data_dir), limit=110)).stdout)
        assert data["streams"] == [] and data["schema"] == "hotmesh"
        assert "empty" in ok(await run_cli("dlq", "list", "--data-dir", str(data_dir))).stdout
    finally:
        stop_if_left_running(data_dir)
