"""The worker, in this process, against the real PostgreSQL: each seed option has a test that fails without it.

Callers are separate caller roles (``env.caller``); workers log in as worker roles with passwords over TCP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import pytest
from pydantic import BaseModel, SecretStr

from mcp_hotmesh import _embedded as embedded
from mcp_hotmesh._config import ConnectionOptions, RetryPolicy, WorkerConfig, WorkerCredentials
from mcp_hotmesh._migrate import migrate
from mcp_hotmesh._postgres import connect, create_pool, pools
from mcp_hotmesh._roles import provision_role
from mcp_hotmesh._streams import CallerAPI, Claimed, WorkerAPI
from mcp_hotmesh._tools import ToolContext, ToolSet
from mcp_hotmesh._worker import Worker
from mcp_hotmesh.errors import ConnectionFailed, HotMeshError
from tests.helpers import FAST, Env, finished, free_port, serving, wait_for

pytestmark = pytest.mark.anyio

class Sum(BaseModel):
    total: int


def adder(runs: list[int] | None = None, *, wrong_result: bool = False) -> ToolSet:
    """A tool set of one tool on ``calc`` that adds two integers; each run is noted in ``runs``. With
    ``wrong_result`` it answers what breaks its own output schema."""
    tools = ToolSet()

    @tools.tool(topic="calc", name="calc")
    async def add(a: int, b: int) -> Sum:
        """Add two integers."""
        if runs is not None:
            runs.append(a + b)
        if wrong_result:
            return {"total": "lots"}  # type: ignore[return-value]  # on purpose: what the test is about
        return Sum(total=a + b)

    return tools


def noting_its_runs(
    topic: str, then: Callable[[int], Awaitable[dict[str, Any]]] | None = None
) -> tuple[ToolSet, list[int]]:
    """A tool set of one tool on ``topic`` that notes each run (0, 1, ...) in the list returned with it, then
    answers what ``then(run)`` returns (``{}`` without it) or raises what it raises."""
    runs: list[int] = []
    tools = ToolSet()

    @tools.tool(topic=topic, name=topic)
    async def job() -> dict[str, Any]:
        """Notes its run."""
        runs.append(len(runs))
        return await then(runs[-1]) if then else {}

    return tools, runs


# ------------------------------------------------------------------------------------------ basics


async def test_call_answered_tools_registered_heartbeat_and_goodbye(env: Env) -> None:
    _, caller = await env.caller(["calc"])
    async with serving(env, adder()):
        [tool] = await caller.tools()
        assert tool.name == "calc" and tool.description == "Add two integers."
        assert tool.input_schema["required"] == ["a", "b"] and tool.output_schema is not None
        assert tool.live_workers == 1
        result = await finished(caller, await caller.call("calc", "", {"a": 2, "b": 3}, 10_000))
        assert result.state == "done" and not result.is_error and result.result == {"total": 5}
    assert (await caller.tools())[0].live_workers == 0  # worker_goodbye on a graceful stop


async def test_invalid_arguments_are_answered_not_retried(env: Env) -> None:
    runs: list[int] = []
    _, caller = await env.caller(["calc"])
    async with serving(env, adder(runs)):
        result = await finished(caller, await caller.call("calc", "", {"a": "two", "b": 3}, 10_000))
    assert result.state == "done" and result.is_error and result.attempt == 0 and runs == []
    assert result.result["error"].startswith("invalid arguments: a: Input should be a valid integer")


async def test_invalid_result_is_answered_not_retried(env: Env) -> None:
    runs: list[int] = []
    _, caller = await env.caller(["calc"])
    async with serving(env, adder(runs, wrong_result=True)):
        result = await finished(caller, await caller.call("calc", "", {"a": 1, "b": 2}, 10_000))
    assert result.state == "done" and result.is_error and runs == [3]
    assert "returned an invalid result" in result.result["error"]


# -------------------------------------------------------------------------------------------- retry


async def test_raising_handler_retried_with_growing_delays_then_dead_lettered(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[int | None] = []
    original = WorkerAPI.fail

    async def spy(self: WorkerAPI, stream: str, id: int, lease: UUID, error: str, retry_in_ms: int | None) -> bool:
        delays.append(retry_in_ms)
        return await original(self, stream, id, lease, error, retry_in_ms)

    monkeypatch.setattr(WorkerAPI, "fail", spy)
    attempts: list[int] = []
    tools = ToolSet()

    @tools.tool(topic="flaky")
    async def flaky(ctx: ToolContext) -> dict[str, Any]:
        """Always fails."""
        attempts.append(ctx.attempt)
        raise RuntimeError(f"boom {ctx.attempt}")

    _, caller = await env.caller(["flaky"])
    retry = RetryPolicy(maximum_attempts=4, initial_interval=20, backoff_coefficient=2, maximum_interval=50)
    async with serving(env, tools, retry=retry, poll_interval=5.0):  # retries come from local wake-ups
        result = await finished(caller, await caller.call("flaky", "", {}, 20_000))
    assert attempts == [0, 1, 2, 3]
    assert delays == [20, 40, 50, None]
    assert result.state == "dead" and result.is_error and result.error == "boom 3" and result.attempt == 4
    assert "Traceback" not in (result.error or "")


async def test_retry_never_scheduled_past_the_deadline(env: Env) -> None:
    async def upstream_down(run: int) -> dict[str, Any]:
        raise ValueError("upstream is down")

    tools, runs = noting_its_runs("flaky", upstream_down)
    _, caller = await env.caller(["flaky"])
    retry = RetryPolicy(initial_interval=2_000, maximum_interval=2_000)
    async with serving(env, tools, retry=retry):
        result = await finished(caller, await caller.call("flaky", "", {}, 1_000))
    assert runs == [0] and result.state == "dead" and result.error == "upstream is down"


# ------------------------------------------------------------------------ deadline, cancel, progress


async def test_deadline_passed_while_queued_never_runs(env: Env) -> None:
    tools, runs = noting_its_runs("slow")
    _, caller = await env.caller(["slow"])
    call_id = await caller.call("slow", "", {}, 50)
    await anyio.sleep(0.1)
    async with serving(env, tools):
        result = await finished(caller, call_id)
        await anyio.sleep(0.2)
    assert not runs
    assert result.state == "expired" and result.error == "the call's deadline passed while it waited in the queue"


async def test_deadline_passing_while_running_cancels_the_handler(env: Env) -> None:
    saw_cancel = anyio.Event()
    tools = ToolSet()

    @tools.tool(topic="slow")
    async def slow() -> dict[str, Any]:
        """Sleeps."""
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            saw_cancel.set()
            raise
        return {}

    _, caller = await env.caller(["slow"])
    async with serving(env, tools, reclaim_delay=10_000):
        result = await finished(caller, await caller.call("slow", "", {}, 400), seconds=5)
        assert saw_cancel.is_set()
    assert result.state == "expired" and result.error == "the call's deadline passed while the tool was running"


async def test_cancel_while_running_cancels_the_handler_at_once(env: Env) -> None:
    started, saw_cancel = anyio.Event(), anyio.Event()
    tools = ToolSet()

    @tools.tool(topic="slow")
    async def slow(ctx: ToolContext) -> dict[str, Any]:
        """Sleeps."""
        started.set()
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            assert ctx.cancelled.is_set()
            saw_cancel.set()
            raise
        return {}

    _, caller = await env.caller(["slow"])
    # A 10 s lease is extended every 5 s: only the caller_cancel NOTIFY can make the worker look within 2 s.
    async with serving(env, tools, reclaim_delay=10_000):
        call_id = await caller.call("slow", "", {}, 60_000)
        with anyio.fail_after(5):
            await started.wait()
        assert await caller.cancel(call_id) == "reserved"
        with anyio.fail_after(2):
            await saw_cancel.wait()
        result = await finished(caller, call_id)
    assert result.state == "cancelled" and result.error == "cancelled by the caller"


async def test_progress_reaches_the_caller(env: Env) -> None:
    go_on = anyio.Event()
    tools = ToolSet()

    @tools.tool(topic="long")
    async def long(ctx: ToolContext) -> dict[str, Any]:
        """Reports progress."""
        await ctx.report_progress(1, 4, "a quarter")
        await go_on.wait()
        return {"done": True}

    _, caller = await env.caller(["long"])
    async with serving(env, tools):
        call_id = await caller.call("long", "", {}, 10_000)

        async def reported() -> bool:
            r = await caller.result(call_id)
            return (r.progress, r.progress_total, r.progress_message) == (1, 4, "a quarter")

        await wait_for(reported)
        go_on.set()
        assert (await finished(caller, call_id)).result == {"done": True}


async def test_run_in_a_task_group_stops_gracefully_when_cancelled(env: Env) -> None:
    started = anyio.Event()
    tools = ToolSet()

    @tools.tool(topic="hang")
    async def hang() -> dict[str, Any]:
        """Never finishes."""
        started.set()
        await anyio.sleep(3600)
        return {}

    role = await env.provision(["hang"], "worker")
    _, caller = await env.caller(["hang"])
    worker = Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, **FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        assert (await caller.tools())[0].live_workers == 1
        call_id = await caller.call("hang", "", {}, 60_000)
        with anyio.fail_after(5):
            await started.wait()
        tg.cancel_scope.cancel()
    row = await env.call_row(call_id)  # released after the grace period, not left to a reclaim
    assert row["state"] == "ready" and row["reclaims"] == 0 and row["lease"] is None
    assert (await caller.tools())[0].live_workers == 0


# ------------------------------------------------------------------------------------ seed options


async def test_readonly_never_consumes_but_publishes_and_registers(env: Env) -> None:
    tools, runs = noting_its_runs("ro")
    _, caller = await env.caller(["ro"])
    call_id = await caller.call("ro", "", {}, 10_000)
    async with serving(env, tools, readonly=True) as worker:
        assert worker.consumers == []
        message_id = await worker.publish("ro", "", {"from": "readonly"})
        await anyio.sleep(0.5)  # two fallback polls, were there a consumer
        [tool] = await caller.tools()
        assert tool.name == "ro" and tool.live_workers == 0
    assert not runs and (await caller.result(call_id)).state == "ready"
    published = await env.message(message_id)
    assert published["state"] == "ready" and published["args"] == '{"from": "readonly"}'


async def test_workflow_names_share_one_consumer_and_dispatch(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    claimed: list[str] = []
    original = WorkerAPI.dequeue
    original_batched = WorkerAPI.respond_and_dequeue

    async def spy(self: WorkerAPI, *args: Any) -> list[Claimed]:
        got = await original(self, *args)
        claimed.extend(m.workflow_name for m in got)
        return got

    # a busy worker also claims while it answers (worker_respond_and_dequeue): count those too
    async def spy_batched(self: WorkerAPI, *args: Any) -> tuple[dict[int, bool], list[Claimed]]:
        answered, got = await original_batched(self, *args)
        claimed.extend(m.workflow_name for m in got)
        return answered, got

    monkeypatch.setattr(WorkerAPI, "dequeue", spy)
    monkeypatch.setattr(WorkerAPI, "respond_and_dequeue", spy_batched)
    tools = ToolSet()

    @tools.tool(topic="math", workflow_name="add", name="math_add")
    async def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    @tools.tool(topic="math", workflow_name="mul", name="math_mul")
    async def mul(a: int, b: int) -> int:
        """Multiply."""
        return a * b

    _, caller = await env.caller(["math"])
    stranger = await caller.call("math", "div", {"a": 6, "b": 3}, 10_000)  # nobody here serves "div"
    async with serving(env, tools) as worker:
        [consumer] = worker.consumers
        assert consumer.topic == "math" and consumer.workflows == ["add", "mul"]
        listening = await env.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE $1 AND query LIKE 'LISTEN %'",
            env.schema + "\\_%")
        assert listening == 1  # the worker listens, on one connection (one per DSN, whatever the topics)
        calls = [(wf, await caller.call("math", wf, {"a": 6, "b": 3}, 10_000)) for wf in ["add", "mul"] * 3]
        results = [(wf, (await finished(caller, c)).result) for wf, c in calls]
        await anyio.sleep(0.5)  # a few more fallback polls: "div" must still be left alone
        assert (await caller.result(stranger)).state == "ready"
    assert results == [("add", {"result": 9}), ("mul", {"result": 18})] * 3
    assert sorted(claimed) == ["add"] * 3 + ["mul"] * 3  # "div" was never claimed here, so never held up
    assert (await env.call_row(stranger))["attempt"] == 0


async def test_concurrency_limit_claims_no_more_than_free_slots(env: Env) -> None:
    running, most = 0, 0
    release = anyio.Event()
    tools = ToolSet()

    @tools.tool(topic="busy")
    async def busy(n: int) -> int:
        """Blocks."""
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return n

    _, caller = await env.caller(["busy"])
    async with serving(env, tools, concurrency=2):
        ids = [await caller.call("busy", "", {"n": n}, 20_000) for n in range(5)]

        async def two_running() -> bool:
            return running == 2

        await wait_for(two_running)
        await anyio.sleep(0.3)
        states = sorted([(await caller.result(i)).state for i in ids])
        assert states == ["ready", "ready", "ready", "reserved", "reserved"]  # not claimed while slots are full
        release.set()
        assert [(await finished(caller, i)).result for i in ids] == [{"result": n} for n in range(5)]
    assert most == 2


async def test_lease_extended_while_a_handler_runs_past_its_reclaim_delay(env: Env) -> None:
    async def leases(run: int) -> dict[str, Any]:
        await anyio.sleep(1.25)  # two and a half times the 500 ms lease
        return {"runs": run + 1}

    tools, runs = noting_its_runs("long", leases)
    _, caller = await env.caller(["long"])
    # extended every 250 ms: each extension has 250 ms to spare before the lease would end (a busy machine)
    async with serving(env, tools, reclaim_delay=500, poll_interval=0.05):
        call_id = await caller.call("long", "", {}, 10_000)
        assert (await finished(caller, call_id)).result == {"runs": 1}
    assert runs == [0] and (await env.call_row(call_id))["reclaims"] == 0


async def test_reclaim_count_dead_letters_after_that_many_reclaims(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async def dead_heart(self: WorkerAPI, stream: str, id: int, lease: UUID, lease_ms: int) -> bool:
        return False  # a worker that hangs: it never extends, so its lease expires

    monkeypatch.setattr(WorkerAPI, "extend", dead_heart)

    async def hang(run: int) -> dict[str, Any]:
        await anyio.sleep(30)
        return {}

    tools, runs = noting_its_runs("stuck", hang)
    _, caller = await env.caller(["stuck"])
    async with serving(env, tools, reclaim_delay=200, reclaim_count=1, poll_interval=0.1):
        result = await finished(caller, await caller.call("stuck", "", {}, 30_000))
    assert runs == [0, 1]  # the first run, one reclaim; the default (3) would have run it four times
    assert result.state == "dead" and result.error == "the worker handling this call stopped responding 2 time(s)"


async def test_task_queue_shares_one_pool(env: Env) -> None:
    tools = ToolSet()

    @tools.tool(topic="one")
    async def one() -> int:
        """One."""
        return 1

    @tools.tool(topic="two")
    async def two() -> int:
        """Two."""
        return 2

    role = await env.provision(["one", "two"], "worker")
    _, caller = await env.caller(["one", "two"])
    # by default the process's one pool for the DSN, shared by every topic and every worker; a task queue asks for
    # a pool of its own, shared by those that name it
    before = len(pools)
    async with Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, **FAST) as plain:
        [default] = {id(c.api.pool) for c in plain.consumers}
        assert len(pools) == before + 1
        for task_queue in [None, "q"]:
            worker = Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, task_queue=task_queue,
                                         **FAST)
            async with worker:
                [pool] = {id(c.api.pool) for c in worker.consumers}
                assert (pool == default) == (task_queue is None)
                assert len(pools) == before + (2 if task_queue else 1)
                for topic, value in [("one", 1), ("two", 2)]:
                    result = await finished(caller, await caller.call(topic, "", {}, 10_000))
                    assert result.result == {"result": value}
    assert len(pools) == before  # a shared pool closes with its last user


async def test_worker_credentials_replace_the_connections_login(env: Env) -> None:
    role = await env.provision(["calc"], "worker")
    _, caller = await env.caller(["calc"])
    wrong = ConnectionOptions(host=env.server.tcp_host, port=env.server.tcp_port, database=env.server.database,
                              user="nobody", password=SecretStr("wrong"))
    tool = adder().tools[0]
    config = WorkerConfig(topic="calc", callback=tool.invoke, connection=wrong,
                          worker_credentials=WorkerCredentials(user=role.role, password=SecretStr(role.password)))
    async with Worker([config], schema=env.schema, **FAST):
        assert (await finished(caller, await caller.call("calc", "", {"a": 1, "b": 1}, 10_000))).result == {"total": 2}
    with pytest.raises(ConnectionFailed):
        async with Worker([config.model_copy(update={"worker_credentials": None})], schema=env.schema, **FAST):
            pass


async def test_a_stream_the_role_may_not_use_fails_at_start(env: Env) -> None:
    role = await env.provision(["other"], "worker")
    with pytest.raises(HotMeshError, match="permission denied"):
        async with Worker.from_toolset(adder(), connection=env.dsn(role), schema=env.schema, **FAST):
            pass


# ---------------------------------------------------------------------------------- server restart


@pytest.mark.slow  # a server of its own, restarted
async def test_worker_recovers_after_the_server_restarts(tmp_path: Path) -> None:
    await anyio.Path(tmp_path).chmod(0o755)
    port = free_port()
    server = await anyio.to_thread.run_sync(lambda: embedded.start(tmp_path / "pg", port=port))
    try:
        admin = await connect(server.admin_dsn)
        try:
            await migrate(admin, "hotmesh")
            worker_role = await provision_role(admin, ["calc"], "worker")
            caller_role = await provision_role(admin, ["calc"], "caller")
        finally:
            await admin.close()
        caller = CallerAPI(await create_pool(server.role_dsn(caller_role.role, caller_role.password)))
        try:
            worker = Worker.from_toolset(adder(), connection=server.role_dsn(worker_role.role, worker_role.password),
                                         **FAST)
            async with worker:
                assert (await finished(caller, await caller.call("calc", "", {"a": 1, "b": 2}, 10_000))).result == {
                    "total": 3}
                await anyio.to_thread.run_sync(server.stop)
                await anyio.sleep(0.5)  # the worker finds the server gone
                server = await anyio.to_thread.run_sync(lambda: embedded.start(tmp_path / "pg", port=port))

                async def answered() -> bool:
                    try:
                        call_id = await caller.call("calc", "", {"a": 2, "b": 2}, 10_000)
                    except ConnectionFailed:
                        return False  # the caller's own pool reconnects too
                    return bool((await finished(caller, call_id)).result == {"total": 4})

                await wait_for(answered, 20)
        finally:
            await caller.pool.close()
    finally:
        await anyio.to_thread.run_sync(server.stop)
