"""Scaling out on one PostgreSQL: more workers, topics and streams add capacity, not cost.

- a call wakes one worker, not every worker on its stream: claims per call stay near one (counted by PostgreSQL
  itself, ``pg_stat_user_functions``);
- a worker process serving 1,000 topics holds the pool's minimum and its LISTEN connection, and answers;
- a role may be allowed 1,000 streams (more than the 8,000 characters of a role setting), and cannot widen them;
- processes a stream does not need stop listening (parking) and come back for a burst; another role allowed the
  same stream cannot draw this role's wake-ups, nor park its processes;
- a pool refused connections by its role's connection limit shares the ones it has: no statement fails.
"""

from __future__ import annotations

import contextlib
import logging

import anyio
import asyncpg
import pytest

from mcp_hotmesh import PermissionDenied, ToolContext, ToolSet, Worker
from mcp_hotmesh._roles import ProvisionedRole, provision_role
from mcp_hotmesh._streams import CallerAPI, WorkerAPI
from tests.helpers import Env, RuntimeOptions, finished, wait_for

pytestmark = pytest.mark.anyio

QUIET: RuntimeOptions = {"poll_interval": 30.0, "heartbeat_interval": 5.0, "shutdown_grace": 0.5}
"""No fallback poll during the test: every claim counted is one a NOTIFY caused."""

PARKING: RuntimeOptions = {**QUIET, "park_after": 0.0, "concurrency": 1}
"""No fallback poll; a process may park as soon as it is not needed, and runs one handler at a time."""

LISTENING: RuntimeOptions = {**QUIET, "park_after": None}
"""No fallback poll, and no parking."""

NARROW: RuntimeOptions = {**QUIET, "concurrency": 8, "pool_size": 10}
"""No fallback poll; eight handlers at once, and a pool that may grow to ten connections."""


def many_topics(count: int) -> ToolSet:
    tools = ToolSet()
    for i in range(count):
        async def echo(n: int) -> int:
            """Echo n."""
            return n

        tools.tool(topic=f"svc.tool_{i:04d}", name=f"tool_{i:04d}")(echo)
    return tools


async def claims(env: Env) -> int:
    """How many claims (``_claim``) the sessions that ended have made, as PostgreSQL counts them."""
    value = await env.admin.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE schemaname = $1 AND funcname = '_claim'",
        env.schema)
    return int(value)


async def test_a_call_wakes_one_of_several_workers(env: Env) -> None:
    tools = ToolSet()

    @tools.tool(topic="herd")
    async def work(n: int) -> int:
        """Work on n."""
        return n

    role = await env.provision(["herd"], "worker")
    await env.admin.execute(f'ALTER ROLE "{role.role}" SET track_functions = \'pl\'')
    _, caller = await env.caller(["herd"])
    workers = 4
    calls = 40
    before = await claims(env)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(workers):
            await stack.enter_async_context(
                Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, **QUIET))
        for n in range(calls):  # one at a time: every worker is idle when each call arrives
            result = await finished(caller, await caller.call("herd", "", {"n": n}, 10_000))
            assert result.result == {"result": n}
    # the workers stopped and their sessions ended: PostgreSQL's counts of them are complete

    async def counted() -> bool:
        return await claims(env) - before >= calls

    await wait_for(counted, 15)
    await anyio.sleep(1)
    made = await claims(env) - before
    # every worker woke on every call before: 4 claims per call, one of them with a message
    assert made / calls <= 1.5, f"{made} claims for {calls} calls with {workers} workers"


async def test_a_worker_serving_1000_topics_holds_at_most_three_connections(env: Env) -> None:
    tools = many_topics(1000)
    role = await env.provision(sorted(tools.topics), "worker")
    _, caller = await env.caller(["svc.tool_0999", "svc.tool_0000"])

    async def connections() -> int:
        return int(await env.admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role.role))

    worker = Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, **QUIET)
    async with worker:
        assert len(worker.consumers) == 1000
        assert await connections() <= 3
        for topic, n in [("svc.tool_0999", 7), ("svc.tool_0000", 8)]:
            result = await finished(caller, await caller.call(topic, "", {"n": n}, 20_000))
            assert result.result == {"result": n}
        assert (await caller.tools())[0].live_workers == 1
        await anyio.sleep(1)
        assert await connections() <= 3


async def test_a_role_may_be_allowed_1000_streams_and_cannot_widen_them(env: Env) -> None:
    streams = [f"svc.tool_{i:04d}" for i in range(1000)]
    assert len(",".join(streams)) > 8000  # more than a role setting holds
    wide = await provision_role(env.admin, streams, "caller", schema=env.schema)
    victim = await env.provision(["svc.victim"], "caller")
    worker_role = await env.provision(streams, "worker")
    api = CallerAPI(await env.pool(wide), env.schema)
    # every stream granted works, the last as the first
    for stream in (streams[0], streams[-1]):
        await api.call(stream, "", {}, 5_000)
    assert {t.stream for t in await api.stats()} == {streams[0], streams[-1]}
    with pytest.raises(PermissionDenied):
        await api.call("svc.victim", "", {}, 5_000)
    # the grants are the admin's: the role can neither write them nor read them
    async with env.session(wide) as conn:
        for attack in (
            f"INSERT INTO \"{env.schema}\".stream_grants VALUES (current_user, 'svc.victim')",
            f"UPDATE \"{env.schema}\".stream_grants SET stream = 'svc.victim'",
            f"DELETE FROM \"{env.schema}\".stream_grants",
            f"SELECT * FROM \"{env.schema}\".stream_grants",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(attack)
    with pytest.raises(PermissionDenied):
        await api.call("svc.victim", "", {}, 5_000)
    victim_api = CallerAPI(await env.pool(victim), env.schema)  # the victim is unaffected
    await victim_api.call("svc.victim", "", {}, 5_000)
    assert [t.stream for t in await victim_api.stats()] == ["svc.victim"]
    # a worker of 1,000 streams heartbeats them all in one statement, and only those
    worker_api = WorkerAPI(await env.pool(worker_role), env.schema)
    assert await worker_api.alive("w1", 10_000, streams, None) == 1000
    with pytest.raises(PermissionDenied):
        await worker_api.alive("w1", 10_000, [*streams, "svc.victim"], None)
    assert set(await worker_api.pending(streams)) == {streams[0], streams[-1]}


async def parked(env: Env, role: ProvisionedRole) -> dict[str, bool]:
    """Each consumer of ``role``: whether it is parked (not listening), as the database records it."""
    rows = await env.admin.fetch(f'SELECT DISTINCT consumer, parked FROM "{env.schema}".workers WHERE role_name = $1',
                                 role.role)
    return {r["consumer"]: r["parked"] for r in rows}


async def test_processes_not_needed_stop_listening_and_listen_again_for_a_burst(env: Env) -> None:
    tools = ToolSet()
    hold = False
    running: set[str] = set()
    all_running, release = anyio.Event(), anyio.Event()

    @tools.tool(topic="parking")
    async def work(n: int, ctx: ToolContext) -> int:
        """Work on n."""
        if hold:
            running.add(ctx.call_id)
            if len(running) == 3:
                all_running.set()
            await release.wait()
        return n

    role = await env.provision(["parking"], "worker")
    _, caller = await env.caller(["parking"])
    async with contextlib.AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(
            Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, **PARKING)) for _ in range(3)]
        first = min(w.consumer_id for w in workers)

        async def two_parked() -> bool:
            return await parked(env, role) == {w.consumer_id: w.consumer_id != first for w in workers}

        await wait_for(two_parked, 20)  # the first consumer of a role never parks; nothing needs the others
        listening = {w.consumer_id: not all(p.parked and p.listener is not None and p.listener.paused
                                            for p in w._pulses.values()) for w in workers}
        assert listening == {w.consumer_id: w.consumer_id == first for w in workers}

        # new calls wake the listening process (no fallback poll runs in this test)
        for n in range(10):
            assert (await finished(caller, await caller.call("parking", "", {"n": n}, 10_000))).result == {"result": n}

        # three calls at once, one handler per process: the parked ones are needed, listen again and take them
        hold = True
        ids = [await caller.call("parking", "", {"n": n}, 30_000) for n in range(3)]
        with anyio.fail_after(20):
            await all_running.wait()
        release.set()
        for call_id in ids:
            assert (await finished(caller, call_id)).finished
        consumers = {(await env.call_row(call_id))["consumer"] for call_id in ids}
        assert consumers == {w.consumer_id for w in workers}


async def test_another_role_on_the_stream_cannot_draw_the_wake_ups_or_park_the_workers(env: Env) -> None:
    tools = ToolSet()

    @tools.tool(topic="shared")
    async def work(n: int) -> int:
        """Work on n."""
        return n

    victim = await env.provision(["shared"], "worker")
    _, hostile = await env.worker(["shared"])  # the admin allowed a second role on the stream
    _, caller = await env.caller(["shared"])
    # the attacker announces a consumer that sorts before any other and never claims
    await hostile.alive("0", 60_000, ["shared"], [[""]])
    async with Worker.from_toolset(tools, connection=env.dsn(victim), schema=env.schema,
                                   **LISTENING) as worker:
        # each call wakes a listening consumer of each role: the victim's takes every one (no poll runs)
        for n in range(8):
            assert (await finished(caller, await caller.call("shared", "", {"n": n}, 10_000))).result == {"result": n}
        # the attacker cannot park the victim's process: only a role's own rows change
        assert await hostile.park(worker.consumer_id, ["shared"], True, 1) is False
        assert await parked(env, victim) == {worker.consumer_id: False}


async def test_a_pool_at_its_roles_connection_limit_shares_its_connections(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    tools = ToolSet()

    @tools.tool(topic="narrow")
    async def work(n: int, ctx: ToolContext) -> int:
        """Work on n, saying how far it got."""
        for step in range(3):  # each a statement of its own: the handlers want more connections than there are
            await ctx.report_progress(step, 3)
        return n

    role = await env.provision(["narrow"], "worker")
    await env.admin.execute(f'ALTER ROLE "{role.role}" CONNECTION LIMIT 3')  # LISTEN and two for the pool
    _, caller = await env.caller(["narrow"])
    caplog.set_level(logging.WARNING, logger="mcp_hotmesh")
    async with Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema,
                                   **NARROW):
        ids = [await caller.call("narrow", "", {"n": n}, 30_000) for n in range(24)]
        results = [await finished(caller, call_id, 30) for call_id in ids]
    assert [r.result for r in results] == [{"result": n} for n in range(24)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("refused this process another connection" in w for w in warnings), warnings
    assert not [w for w in warnings if "failed" in w], warnings  # no claim, answer or progress failed for it
