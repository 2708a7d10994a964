"""Scaling out on one PostgreSQL: more workers, topics and streams add capacity, not cost.

- a call wakes one worker, not every worker on its stream: claims per call stay near one (counted by PostgreSQL
  itself, ``pg_stat_user_functions``);
- a worker process serving 1,000 topics holds the pool's minimum and its LISTEN connection, and answers;
- a role may be allowed 1,000 streams (more than the 8,000 characters of a role setting), and cannot widen them.
"""

from __future__ import annotations

import contextlib

import anyio
import asyncpg
import pytest

from mcp_hotmesh import PermissionDenied, ToolSet, Worker
from mcp_hotmesh._roles import provision_role
from mcp_hotmesh._streams import CallerAPI, WorkerAPI
from tests.helpers import Env, RuntimeOptions, finished, wait_for

pytestmark = pytest.mark.anyio

QUIET: RuntimeOptions = {"poll_interval": 30.0, "heartbeat_interval": 5.0, "shutdown_grace": 0.5}
"""No fallback poll during the test: every claim counted is one a NOTIFY caused."""


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
