"""The batch functions of the call path (caller_call_many, caller_results, worker_respond_and_dequeue) keep every
rule of the single ones: the allow-list, the call's owner, the lease, the sizes, the role kinds; a refused batch
writes nothing. And ``batch.Batcher``: natural batching, per-item errors, cancellation, shutdown."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from mcp_hotmesh._batching import Batcher
from mcp_hotmesh._streams import Answer
from mcp_hotmesh.errors import ConnectionFailed, InvalidInput, PayloadTooLarge, PermissionDenied
from tests.helpers import Env, finished, serving

pytestmark = pytest.mark.anyio


async def rows(env: Env) -> list[dict[str, Any]]:
    got = await env.admin.fetch(f'SELECT id, stream, state, result, owner FROM "{env.schema}".messages ORDER BY id')
    return [dict(r) for r in got]


# ------------------------------------------------------------------------------------------- caller side


async def test_call_many_enqueues_in_order_and_refuses_the_whole_batch_for_one_denied_stream(env: Env) -> None:
    role, caller = await env.caller(["a", "b"])
    ids = await caller.call_many([("a", "", {"n": 1}, 60_000), ("b", "w", {"n": 2}, 60_000), ("a", "", {}, 1)])
    assert len(ids) == 3 and len(set(ids)) == 3
    for call_id, n in zip(ids, [1, 2, None], strict=True):
        row = await env.call_row(call_id)
        assert row["owner"] == role.role and row["state"] == "ready"
        assert json.loads(row["args"]) == ({"n": n} if n is not None else {})
    before = await rows(env)
    with pytest.raises(PermissionDenied):
        await caller.call_many([("a", "", {}, 60_000), ("c", "", {}, 60_000)])
    with pytest.raises(InvalidInput):
        await caller.call_many([("a", "", {}, 60_000), ("a", "", [1, 2], 60_000)])  # not an object
    with pytest.raises(InvalidInput):
        await caller.call_many([("a", "x" * 201, {}, 60_000)])
    await env.set("max_payload_bytes", 100)
    with pytest.raises(PayloadTooLarge):
        await caller.call_many([("a", "", {}, 60_000), ("a", "", {"x": "y" * 200}, 60_000)])
    assert await rows(env) == before  # nothing of a refused batch was written


async def test_call_many_arrays_must_agree_and_stay_under_max_batch(env: Env) -> None:
    role, _ = await env.caller(["a"])
    conn = await env.connect(role)
    try:
        for args in [(["a", "a"], ["", ""], ["{}"], [1, 1]), (["a"], [""], ["{}"], [1, 1])]:
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetchval(f'SELECT "{env.schema}".caller_call_many($1, $2, $3::jsonb[], $4)', *args)
            assert info.value.sqlstate == "HM002"
    finally:
        await conn.close()
    await env.set("max_batch", 2)
    _, caller = await env.caller(["a"])
    with pytest.raises(InvalidInput):
        await caller.call_many([("a", "", {}, 60_000)] * 3)


async def test_results_are_only_the_callers_own(env: Env) -> None:
    _, mine = await env.caller(["a"])
    _, other = await env.caller(["a"])
    my_ids = await mine.call_many([("a", "", {}, 60_000)] * 2)
    their_id = await other.call("a", "", {}, 60_000)
    got = await mine.results([*my_ids, their_id, uuid.uuid4()])
    assert set(got) == set(my_ids)  # another role's call and an unknown id: left out, the same answer
    assert all(r.state == "ready" for r in got.values())
    assert set(await other.results([*my_ids, their_id])) == {their_id}


async def test_caller_and_worker_batch_functions_are_for_their_kind_only(env: Env) -> None:
    worker_role, _ = await env.worker(["a"])
    caller_role, _ = await env.caller(["a"])
    s = env.schema
    async with env.session(worker_role) as conn:
        for sql in (f"SELECT {s}.caller_call_many('{{a}}', '{{\"\"}}', '{{}}'::jsonb[], '{{1}}')",
                    f"SELECT * FROM {s}.caller_results('{{}}')"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(sql)
    async with env.session(caller_role) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f"SELECT * FROM {s}.worker_respond_and_dequeue('a', 'c', '{{}}', '{{}}', '{{}}', "
                             "'{}', 1, 1000)")


# ------------------------------------------------------------------------------------------- worker side


async def test_respond_and_dequeue_answers_only_held_leases_and_claims_the_next(env: Env) -> None:
    _, caller = await env.caller(["a", "b"])
    _, worker = await env.worker(["a"])
    _, worker_b = await env.worker(["b"])
    ids = await caller.call_many([("a", "", {"n": i}, 60_000) for i in range(4)])
    call_b = await caller.call("b", "", {}, 60_000)
    held = await worker.dequeue("a", "w", 2, 60_000)
    [held_b] = await worker_b.dequeue("b", "wb", 1, 60_000)
    answers = [Answer(held[0].id, held[0].lease, {"ok": 0}),
               Answer(held[1].id, uuid.uuid4(), {"forged": True}),  # a lease it does not hold
               Answer(held_b.id, held_b.lease, {"other": "stream"})]  # a message of another stream
    answered, claimed = await worker.respond_and_dequeue("a", "w", answers, 5, 60_000)
    assert answered == {held[0].id: True, held[1].id: False, held_b.id: False}
    assert sorted(m.args["n"] for m in claimed) == [2, 3]  # the two still queued, with their leases
    got = await caller.results([*ids, call_b])
    assert got[ids[0]].state == "done" and got[ids[0]].result == {"ok": 0}
    assert got[ids[1]].state == "reserved" and got[ids[1]].result is None
    assert got[call_b].state == "reserved"
    # the claimed ones are answered by the next batch, which claims nothing more
    answered, claimed = await worker.respond_and_dequeue(
        "a", "w", [Answer(m.id, m.lease, {"n": m.args["n"]}, True) for m in claimed], 5, 60_000)
    assert all(answered.values()) and claimed == []
    got = await caller.results(ids[2:])
    assert all(r.state == "done" and r.is_error for r in got.values())


async def test_respond_and_dequeue_refusals_write_nothing(env: Env) -> None:
    _, caller = await env.caller(["a"])
    _, worker = await env.worker(["a"])
    await caller.call_many([("a", "", {}, 60_000)] * 2)
    held = await worker.dequeue("a", "w", 2, 60_000)
    before = await rows(env)
    with pytest.raises(PermissionDenied):
        await worker.respond_and_dequeue("b", "w", [Answer(held[0].id, held[0].lease, {})], 1, 60_000)
    await env.set("max_payload_bytes", 50)
    with pytest.raises(PayloadTooLarge):
        await worker.respond_and_dequeue(
            "a", "w", [Answer(held[0].id, held[0].lease, {}), Answer(held[1].id, held[1].lease, {"x": "y" * 100})],
            1, 60_000)
    with pytest.raises(InvalidInput):  # no consumer name, while claiming
        await worker.respond_and_dequeue("a", "", [], 1, 60_000)
    assert await rows(env) == before


async def test_planner_and_commit_settings_do_not_outlive_the_functions(env: Env) -> None:
    """enable_seqscan is given back when the function returns; synchronous_commit = off lasts to the end of
    the transaction that claimed or enqueued (and no longer)."""
    role, _ = await env.worker(["a"])
    conn = await env.connect(role)
    try:
        async with conn.transaction():
            await conn.fetch(f'SELECT * FROM "{env.schema}".worker_dequeue($1, $2, 1, 1000)', "a", "w")
            assert await conn.fetchval("SHOW enable_seqscan") == "on"
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------- Batcher


async def test_batcher_sends_what_arrives_meanwhile_together_with_per_item_errors() -> None:
    sent: list[list[int]] = []
    gate = anyio.Event()

    async def flush(items: list[int]) -> list[int | BaseException]:
        sent.append(items)
        await gate.wait()
        return [ValueError("odd") if i % 2 else i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(flush, max_size=3)
    results: dict[int, int | ValueError] = {}

    async def submit(i: int) -> None:
        try:
            results[i] = await batcher.submit(i)
        except ValueError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        for i in range(6):
            tg.start_soon(submit, i)
            await anyio.lowlevel.checkpoint()
        await anyio.sleep(0.01)
        gate.set()
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert sent[0] == [0] and sorted(i for b in sent for i in b) == list(range(6))
    assert all(len(b) <= 3 for b in sent)
    assert {i: r for i, r in results.items() if not isinstance(r, Exception)} == {0: 0, 2: 20, 4: 40}
    assert all(isinstance(results[i], ValueError) for i in (1, 3, 5))


async def test_batcher_cancellation_withdraws_a_waiting_item_and_reports_an_orphan() -> None:
    gate = anyio.Event()
    flushed: list[int] = []
    orphans: list[tuple[int, int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        flushed.extend(items)
        await gate.wait()
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush, on_orphan=lambda item, value: orphans.append((item, value)))
    in_flight, waiting = anyio.CancelScope(), anyio.CancelScope()

    async def submit(scope: anyio.CancelScope, item: int) -> None:
        with scope:
            await batcher.submit(item)

    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        tg.start_soon(submit, in_flight, 0)
        await anyio.sleep(0.01)  # 0 is in flight (the flusher waits on the gate)
        tg.start_soon(submit, waiting, 1)
        await anyio.sleep(0.01)  # 1 waits for the next batch
        in_flight.cancel()
        waiting.cancel()
        await anyio.sleep(0.01)
        gate.set()
        await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert flushed == [0]  # the waiting one was withdrawn, never sent
    assert orphans == [(0, 0)]  # the one in flight was done for nobody: reported, to be undone


async def test_batcher_fails_what_waits_when_it_stops() -> None:
    gate = anyio.Event()

    async def flush(items: list[int]) -> list[int | BaseException]:
        await gate.wait()
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush)
    errors: list[BaseException] = []

    async def submit(i: int) -> None:
        try:
            await batcher.submit(i)
        except ConnectionFailed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as outer, anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        for i in range(3):
            outer.start_soon(submit, i)
        await anyio.sleep(0.02)
        tg.cancel_scope.cancel()  # the flusher stops with one batch in flight and more waiting
    assert len(errors) == 3


# ---------------------------------------------------------------------------------------- lease keeper


async def test_a_cancel_notify_for_a_stopped_handler_leaves_the_lease_keeper_waiting(env: Env) -> None:
    """A handler stopped for a lost lease that has not ended yet (it shields itself), then a ``c:<id>`` NOTIFY
    for it: the one task that keeps every lease must not spin on it (the whole worker would hang)."""
    from mcp_hotmesh._streams import worker_channel
    from mcp_hotmesh._tools import ToolSet

    tools = ToolSet()
    started = anyio.Event()

    @tools.tool(topic="slowlost", name="slowlost")
    async def stubborn() -> dict[str, Any]:
        """Ignores cancellation for a while."""
        started.set()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(1.0)
        return {}

    @tools.tool(topic="quick")
    async def quick() -> dict[str, Any]:
        """Answers at once."""
        return {"quick": True}

    _, caller = await env.caller(["slowlost", "quick"])
    async with serving(env, tools, reclaim_delay=100, poll_interval=0.05):
        call_id = await caller.call("slowlost", "", {}, 60_000)
        with anyio.fail_after(10):
            await started.wait()
        row = await env.call_row(call_id)
        # the lease is lost (the call ended elsewhere): the next extension says so and the handler is stopped
        await env.admin.execute(f"UPDATE \"{env.schema}\".messages SET state = 'done' WHERE id = $1", row["id"])
        await anyio.sleep(0.2)
        await env.admin.execute("SELECT pg_notify($1, $2)", worker_channel(env.schema, "slowlost"), f"c:{row['id']}")
        # the worker goes on serving while the stopped handler is still shielded
        answer = await finished(caller, await caller.call("quick", "", {}, 60_000), seconds=5)
        assert answer.result == {"quick": True}
