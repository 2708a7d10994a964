"""The whole message life through SQL API v1, as the scoped roles that use it in production."""

from __future__ import annotations

from uuid import UUID

import anyio
import pytest

from mcp_hotmesh._streams import CallerAPI, Claimed, WorkerAPI
from mcp_hotmesh.errors import NotFound, PayloadTooLarge
from tests.helpers import Env

pytestmark = pytest.mark.anyio


async def a_call(env: Env, timeout_ms: int = 60_000) -> tuple[WorkerAPI, CallerAPI, UUID]:
    """A worker role and a caller role on stream ``s``, and a call the caller made there (still queued)."""
    _, worker = await env.worker(["s"])
    _, caller = await env.caller(["s"])
    return worker, caller, await caller.call("s", "", {}, timeout_ms)


async def test_call_claim_respond_result(env: Env) -> None:
    _, worker = await env.worker(["orders"])
    _, caller = await env.caller(["orders"])
    call_id = await caller.call("orders", "", {"n": 1}, 10_000)
    assert (await caller.result(call_id)).state == "ready"

    [msg] = await worker.dequeue("orders", "w1", 10, 5_000)
    assert msg.args == {"n": 1} and msg.attempt == 0 and msg.reclaims == 0 and msg.deadline is not None
    assert (await caller.result(call_id)).state == "reserved"
    assert await worker.dequeue("orders", "w2", 10, 5_000) == []  # held: nobody else gets it

    assert await worker.progress("orders", msg.id, msg.lease, 1, 2, "half way")
    mid = await caller.result(call_id)
    assert (mid.progress, mid.progress_total, mid.progress_message) == (1, 2, "half way")

    assert await worker.respond("orders", msg.id, msg.lease, {"ok": True})
    done = await caller.result(call_id)
    assert done.state == "done" and done.result == {"ok": True} and not done.is_error
    assert not await worker.respond("orders", msg.id, msg.lease, {"again": True})  # answered once
    assert (await caller.result(call_id)).result == {"ok": True}


async def test_handler_error_answer(env: Env) -> None:
    worker, caller, call_id = await a_call(env, 10_000)
    [msg] = await worker.dequeue("s", "w", 1, 5_000)
    assert await worker.respond("s", msg.id, msg.lease, {"message": "bad input"}, is_error=True)
    result = await caller.result(call_id)
    assert result.state == "done" and result.is_error and result.result == {"message": "bad input"}


async def test_retry_waits_for_visible_at_then_dead_letters(env: Env) -> None:
    worker, caller, call_id = await a_call(env)
    [msg] = await worker.dequeue("s", "w", 1, 5_000)
    assert await worker.fail("s", msg.id, msg.lease, "boom 1", 300)
    assert (await caller.result(call_id)).state == "ready"
    assert await worker.dequeue("s", "w", 1, 5_000) == []  # not visible yet
    await anyio.sleep(0.35)
    [again] = await worker.dequeue("s", "w", 1, 5_000)
    assert again.id == msg.id and again.attempt == 1 and again.lease != msg.lease
    assert not await worker.respond("s", msg.id, msg.lease, {})  # the first lease is void
    assert await worker.fail("s", again.id, again.lease, "boom 2", None)  # no more retries
    dead = await caller.result(call_id)
    assert dead.state == "dead" and dead.is_error and dead.error == "boom 2" and dead.attempt == 2


async def test_retry_never_scheduled_past_the_deadline(env: Env) -> None:
    worker, caller, call_id = await a_call(env, 1_000)
    [msg] = await worker.dequeue("s", "w", 1, 5_000)
    assert await worker.fail("s", msg.id, msg.lease, "flaky", 5_000)
    result = await caller.result(call_id)
    assert result.state == "dead" and result.error == "flaky"


async def test_reclaim_after_lease_expiry_then_dead_letter(env: Env) -> None:
    worker, caller, call_id = await a_call(env)
    [first] = await worker.dequeue("s", "w1", 1, 100, reclaim_count=1)
    await anyio.sleep(0.15)
    [second] = await worker.dequeue("s", "w2", 1, 100, reclaim_count=1)
    assert second.id == first.id and second.reclaims == 1
    assert not await worker.respond("s", first.id, first.lease, {"late": True})  # w1 lost its lease
    await anyio.sleep(0.15)
    assert await worker.dequeue("s", "w3", 1, 100, reclaim_count=1) == []  # reclaims used up
    dead = await caller.result(call_id)
    assert dead.state == "dead" and "stopped responding" in (dead.error or "")


async def test_deadline_passed_while_queued_is_never_run(env: Env) -> None:
    worker, caller, call_id = await a_call(env, 50)
    await anyio.sleep(0.1)
    assert await worker.dequeue("s", "w", 10, 5_000) == []
    result = await caller.result(call_id)
    assert result.state == "expired" and "deadline" in (result.error or "")  # stopped: not dead-lettered


async def test_cancel_before_processing(env: Env) -> None:
    worker, caller, call_id = await a_call(env)
    assert await caller.cancel(call_id) == "ready"
    assert await worker.dequeue("s", "w", 10, 5_000) == []
    result = await caller.result(call_id)
    assert result.state == "cancelled" and result.error == "cancelled by the caller"


async def test_cancel_during_processing_is_seen_by_extend(env: Env) -> None:
    worker, caller, call_id = await a_call(env)
    [msg] = await worker.dequeue("s", "w", 1, 5_000)
    assert await worker.extend("s", msg.id, msg.lease, 5_000) is False
    assert await caller.cancel(call_id) == "reserved"
    result = await caller.result(call_id)  # it ended at once, for its caller
    assert result.state == "cancelled" and result.error == "cancelled by the caller"
    assert await worker.extend("s", msg.id, msg.lease, 5_000) is True
    # the worker's answer is taken and dropped (no lost lease): cancelled calls are never retried
    assert await worker.fail("s", msg.id, msg.lease, "stopped", 10)
    assert await worker.respond("s", msg.id, msg.lease, {"late": True})
    result = await caller.result(call_id)
    assert result.state == "cancelled" and result.error == "cancelled by the caller" and result.result is None


async def test_extend_keeps_the_lease(env: Env) -> None:
    worker, _, _ = await a_call(env)
    [msg] = await worker.dequeue("s", "w1", 1, 100)
    for _ in range(3):
        await anyio.sleep(0.06)
        assert await worker.extend("s", msg.id, msg.lease, 100) is False
    assert await worker.dequeue("s", "w2", 1, 100) == []
    await anyio.sleep(0.15)
    assert await worker.extend("s", msg.id, msg.lease, 100) is False  # expired but not reclaimed: still ours
    [stolen] = await _after_expiry(worker)
    assert await worker.extend("s", msg.id, msg.lease, 100) is None  # reclaimed: lost
    assert stolen.id == msg.id


async def _after_expiry(worker: WorkerAPI) -> list[Claimed]:
    await anyio.sleep(0.15)
    return await worker.dequeue("s", "w2", 1, 100)


async def test_release_gives_the_message_back_without_a_reclaim(env: Env) -> None:
    worker, _, _ = await a_call(env)
    [msg] = await worker.dequeue("s", "w1", 1, 60_000)
    assert await worker.release("s", msg.id, msg.lease)
    [again] = await worker.dequeue("s", "w2", 1, 60_000)
    assert again.id == msg.id and again.reclaims == 0


async def test_publish_and_workflow_filter(env: Env) -> None:
    _, worker = await env.worker(["s"])
    a = await worker.publish("s", "alpha", {"x": 1})
    b = await worker.publish("s", "beta", {"x": 2})
    [got] = await worker.dequeue("s", "w", 10, 5_000, workflows=["beta"])
    assert got.id == b and got.workflow_name == "beta"
    [got] = await worker.dequeue("s", "w", 10, 5_000, workflows=["alpha"])
    assert got.id == a


async def test_batch_claims_in_order(env: Env) -> None:
    _, worker = await env.worker(["s"])
    ids = [await worker.publish("s", "", {"i": i}) for i in range(5)]
    first = await worker.dequeue("s", "w", 3, 5_000)
    second = await worker.dequeue("s", "w", 3, 5_000)
    assert [m.id for m in first] == ids[:3] and [m.id for m in second] == ids[3:]


async def test_idempotency_key_returns_the_same_call(env: Env) -> None:
    _, caller = await env.caller(["s"])
    one = await caller.call("s", "", {"a": 1}, 60_000, "key-1")
    two = await caller.call("s", "", {"a": 1}, 60_000, "key-1")
    three = await caller.call("s", "", {"a": 1}, 60_000, "key-2")
    assert one == two != three


async def test_oversized_arguments_are_refused_and_nothing_is_enqueued(env: Env) -> None:
    _, caller = await env.caller(["s"])
    await env.set("max_payload_bytes", 1000)
    with pytest.raises(PayloadTooLarge):
        await caller.call("s", "", {"blob": "x" * 2000}, 60_000)
    count = await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".messages')
    assert count == 0


async def test_unknown_call_is_not_found(env: Env) -> None:
    _, caller = await env.caller(["s"])
    import uuid

    with pytest.raises(NotFound):
        await caller.result(uuid.uuid4())
    with pytest.raises(NotFound):
        await caller.cancel(uuid.uuid4())


async def test_tools_registry_and_live_workers(env: Env) -> None:
    _, worker = await env.worker(["s", "t"])
    _, caller = await env.caller(["s"])
    tool = {
        "name": "echo",
        "description": "Echo the input.",
        "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}},
        "output_schema": {"type": "object"},
    }
    assert await worker.register_tool("s", "", tool)
    assert not await worker.register_tool("s", "", tool)  # unchanged: no notification, no write
    assert await worker.register_tool("t", "", {**tool, "name": "hidden"})
    [record] = await caller.tools()  # only the caller's streams
    assert (record.name, record.stream, record.live_workers) == ("echo", "s", 0)
    await worker.heartbeat(["s"], "w1", 5_000)
    assert (await caller.tools())[0].live_workers == 1
    await worker.goodbye("w1")
    assert (await caller.tools())[0].live_workers == 0
    assert await worker.unregister_tool("s", "")
    assert await caller.tools() == []
