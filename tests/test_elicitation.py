"""A handler's questions to the calling client through the queue (``ctx.elicit``, ``ctx.sample``), with the real
``mcp`` client answering; and the attacks a worker or caller role could try on them, refused in the database or
the gateway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CreateMessageRequestParams, CreateMessageResult, ElicitRequestParams, ElicitResult, TextContent
from pydantic import BaseModel

from examples.conformance import tools as conformance
from mcp_hotmesh import CannotAsk, ToolContext, ToolSet
from mcp_hotmesh._asking import NO_ELICITATION
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._streams import CallerAPI, WorkerAPI
from mcp_hotmesh.errors import InvalidInput, LeaseLost, PayloadTooLarge, PermissionDenied
from tests.helpers import TOKEN, Env, Hub, http_client, http_server, hub_for, text_of, wait_for

pytestmark = pytest.mark.anyio

TOOLS = ToolSet(list(conformance.toolset.tools))
SIZE = {"type": "object", "properties": {"size": {"type": "string", "enum": ["S", "M", "L"]},
                                         "count": {"type": "integer", "minimum": 1}}, "required": ["size"]}
seen: dict[str, Any] = {}


@TOOLS.tool(name="ask_size", topic="ask", workflow_name="size")
async def ask_size(ctx: ToolContext) -> dict[str, Any]:
    """Ask which size, twice (one question after the other), and say what the user answered."""
    first = await ctx.elicit("Which size?", SIZE)
    second = await ctx.elicit("Sure?", {"type": "object", "properties": {"sure": {"type": "boolean"}}})
    return {"first": first.action, "content": first.content, "second": second.action, "sure": second.content}


class Shipping(BaseModel):
    city: str
    express: bool = False


@TOOLS.tool(name="ask_model", topic="ask", workflow_name="model")
async def ask_model(ctx: ToolContext) -> dict[str, Any]:
    """Ask with a pydantic model as the schema."""
    answer = await ctx.elicit("Ship where?", Shipping)
    return {"city": answer.data.city if answer.data else None, "express": answer.data.express if answer.data else None}


@TOOLS.tool(name="ask_or_not", topic="ask", workflow_name="or_not")
async def ask_or_not(ctx: ToolContext) -> dict[str, Any]:
    """Ask; when the client cannot be asked, go on without the answer."""
    try:
        await ctx.elicit("Which size?", SIZE)
    except CannotAsk as exc:
        seen["cannot_ask"] = str(exc)
        return {"asked": False}
    return {"asked": True}


@TOOLS.tool(name="ask_forever", topic="ask", workflow_name="forever")
async def ask_forever(ctx: ToolContext) -> dict[str, Any]:
    """Ask a question nobody answers in time."""
    try:
        await ctx.elicit("Anyone?", SIZE)
    except anyio.get_cancelled_exc_class():
        seen["forever_cancelled"] = True
        raise
    return {}


@pytest.fixture
async def hub(env: Env) -> AsyncIterator[Hub]:
    async with hub_for(env, toolset=TOOLS, call_timeout=30, extra_streams=["hostile.ask"]) as h:
        yield h


def answering(*answers: ElicitResult, asked: list[ElicitRequestParams] | None = None) -> Any:
    queue = list(answers)

    async def callback(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        if asked is not None:
            asked.append(params)
        return queue.pop(0)

    return callback


# ------------------------------------------------------------------------------------------ the happy paths
async def test_an_answer_reaches_the_handler(hub: Hub) -> None:
    asked: list[ElicitRequestParams] = []
    callback = answering(ElicitResult(action="accept", content={"size": "M", "count": 2}),
                         ElicitResult(action="accept", content={"sure": True}), asked=asked)
    async with Client(hub.gateway.server, mode="legacy", elicitation_callback=callback) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("ask_size", {})
    assert not result.is_error, text_of(result)
    assert result.structured_content == {"first": "accept", "content": {"size": "M", "count": 2},
                                         "second": "accept", "sure": {"sure": True}}
    assert [a.message for a in asked] == ["Which size?", "Sure?"]
    assert asked[0].requested_schema == SIZE  # type: ignore[union-attr]
    assert await hub.unfinished() == 0
    row = await hub.env.admin.fetchrow(f'SELECT seq, response FROM "{hub.env.schema}".requests')
    assert row is not None and row["seq"] == 2  # one row per call: the latest question


async def test_an_answer_over_streamable_http(hub: Hub) -> None:
    """Over HTTP the question rides the tool call's own response stream (as the conformance suite's client
    expects, which opens no other)."""
    callback = answering(ElicitResult(action="accept", content={"username": "ada", "email": "ada@example.com"}))
    async with http_server(hub.gateway) as url, http_client(TOKEN) as http, Client(
            streamable_http_client(f"{url}/mcp", http_client=http), mode="legacy",
            elicitation_callback=callback) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("test_elicitation", {"message": "Who are you?"})
    assert text_of(result).startswith("User response: action=accept, content=")
    assert "'username': 'ada'" in text_of(result) and "'email': 'ada@example.com'" in text_of(result)


async def test_a_pydantic_model_as_the_schema(hub: Hub) -> None:
    callback = answering(ElicitResult(action="accept", content={"city": "Oslo", "express": True}))
    async with Client(hub.gateway.server, mode="legacy", elicitation_callback=callback) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("ask_model", {})
    assert result.structured_content == {"city": "Oslo", "express": True}, text_of(result)


@pytest.mark.parametrize("action", ["decline", "cancel"])
async def test_decline_and_cancel_end_the_call_cleanly(hub: Hub, action: str) -> None:
    callback = answering(ElicitResult(action=action), ElicitResult(action=action))  # type: ignore[arg-type]
    async with Client(hub.gateway.server, mode="legacy", elicitation_callback=callback) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("ask_size", {})
    assert result.structured_content == {"first": action, "content": None, "second": action, "sure": None}
    assert await hub.unfinished() == 0


async def test_an_answer_that_does_not_fit_the_question_is_refused(hub: Hub) -> None:
    callback = answering(ElicitResult(action="accept", content={"size": "XXL"}))
    async with Client(hub.gateway.server, mode="legacy", elicitation_callback=callback) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("ask_size", {})
    assert result.is_error and "the client's answer does not fit the question" in text_of(result)


async def test_the_deadline_ends_a_question_nobody_answers(env: Env) -> None:
    client_cancelled = anyio.Event()

    async def never(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        try:
            await anyio.sleep(120)
        except anyio.get_cancelled_exc_class():
            client_cancelled.set()
            raise
        raise AssertionError("not reached")

    seen.pop("forever_cancelled", None)
    async with hub_for(env, toolset=TOOLS, call_timeout=3) as hub:
        async with Client(hub.gateway.server, mode="legacy", elicitation_callback=never) as client:
            with anyio.fail_after(30):
                result = await client.call_tool("ask_forever", {})
            assert result.is_error and "did not finish within 3 seconds" in text_of(result)
            with anyio.fail_after(15):
                await client_cancelled.wait()  # the question was withdrawn from the client

        async def handler_stopped() -> bool:
            return seen.get("forever_cancelled") is True and await hub.unfinished() == 0

        await wait_for(handler_stopped, 20)


async def test_sampling_reaches_the_clients_model(hub: Hub) -> None:
    prompts: list[CreateMessageRequestParams] = []

    async def model(context: ClientRequestContext, params: CreateMessageRequestParams) -> CreateMessageResult:
        prompts.append(params)
        return CreateMessageResult(role="assistant", content=TextContent(text="Paris"), model="test-model",
                                   stop_reason="endTurn")

    async with Client(hub.gateway.server, mode="legacy", sampling_callback=model) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("test_sampling", {"prompt": "Capital of France?"})
    assert text_of(result) == "LLM response: Paris"
    assert prompts[0].max_tokens == 100
    assert prompts[0].messages[0].content == TextContent(text="Capital of France?")


# ------------------------------------------------------------------------------- clients that cannot answer
async def test_a_client_without_the_capability_gets_a_clear_error(hub: Hub) -> None:
    async with Client(hub.gateway.server, mode="legacy") as client:
        with anyio.fail_after(30):
            result = await client.call_tool("test_elicitation", {"message": "Who are you?"})
            sampled = await client.call_tool("test_sampling", {"prompt": "hi"})
            handled = await client.call_tool("ask_or_not", {})
    assert result.is_error and text_of(result) == NO_ELICITATION
    assert sampled.is_error and "does not support sampling" in text_of(sampled)
    assert handled.structured_content == {"asked": False}  # a handler may catch CannotAsk and go on
    assert seen["cannot_ask"] == NO_ELICITATION
    assert await hub.unfinished() == 0
    assert await hub.rows("is_error AND state = 'done'") == 2  # refused once each: no retries, no dead letters


async def test_a_modern_era_client_is_told_it_cannot_be_asked(hub: Hub) -> None:
    callback = answering(ElicitResult(action="accept", content={"username": "u", "email": "e"}))
    async with Client(hub.gateway.server, elicitation_callback=callback) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("test_elicitation", {"message": "Who are you?"})
    assert result.is_error and "cannot carry requests from the server to the client" in text_of(result)


# ------------------------------------------------------------------------------------------------ attacks
async def _held_call(env: Env, stream: str) -> tuple[WorkerAPI, CallerAPI, Any, Any]:
    """A call made by a caller role and claimed by a worker role, as raw API objects (no gateway)."""
    _, worker = await env.worker([stream])
    _, caller = await env.caller([stream])
    call_id = await caller.call(stream, "", {}, 60_000)
    claimed = await worker.dequeue(stream, "w", 1, 60_000)
    assert len(claimed) == 1
    return worker, caller, call_id, claimed[0]


async def test_a_worker_cannot_ask_on_a_call_it_does_not_hold(env: Env) -> None:
    worker, _, _, msg = await _held_call(env, "ask.a")
    intruder_role, intruder = await env.worker(["ask.b"])
    _, other_stream_worker = await env.worker(["ask.a"])
    question = {"message": "m", "requestedSchema": SIZE}
    with pytest.raises(PermissionDenied):  # not its stream
        await intruder.request("ask.a", msg.id, msg.lease, "elicit", question)
    from uuid import uuid4
    assert await other_stream_worker.request("ask.a", msg.id, uuid4(), "elicit", question) is None  # no lease
    with pytest.raises(LeaseLost):
        await other_stream_worker.request_answer("ask.a", msg.id, uuid4(), 1)
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{env.schema}".requests') == 0
    # a fire-and-forget message has no caller to ask
    await worker.publish("ask.a", "", {})
    published = await worker.dequeue("ask.a", "w", 1, 60_000)
    with pytest.raises(InvalidInput, match="no caller to ask"):
        await worker.request("ask.a", published[0].id, published[0].lease, "elicit", question)
    assert intruder_role.role


async def test_questions_are_bounded_and_one_is_pending_at_a_time(env: Env) -> None:
    worker, _, _, msg = await _held_call(env, "ask.c")
    with pytest.raises(PayloadTooLarge, match="question larger than 65536 bytes"):
        await worker.request("ask.c", msg.id, msg.lease, "elicit", {"message": "x" * 70_000})
    deep: Any = "x"
    for _ in range(20):
        deep = {"a": deep}
    with pytest.raises(PayloadTooLarge, match="deeper than 16"):
        await worker.request("ask.c", msg.id, msg.lease, "elicit", deep)
    with pytest.raises(InvalidInput, match="kind elicit or sample"):
        await worker.request("ask.c", msg.id, msg.lease, "shell", {"message": "m"})
    assert await worker.request("ask.c", msg.id, msg.lease, "elicit", {"message": "m"}) == 1
    with pytest.raises(InvalidInput, match="still waiting for its answer"):
        await worker.request("ask.c", msg.id, msg.lease, "elicit", {"message": "again"})
    assert await worker.request_answer("ask.c", msg.id, msg.lease, 1) is None


async def test_only_the_calls_owner_reads_and_answers_its_question(env: Env) -> None:
    worker, caller, call_id, msg = await _held_call(env, "ask.d")
    _, stranger = await env.caller(["ask.d"])  # same stream, another caller role
    assert await worker.request("ask.d", msg.id, msg.lease, "elicit", {"message": "secret?"}) == 1
    assert await stranger.request(call_id) is None
    assert await stranger.answer(call_id, 1, {"action": "accept", "content": {"x": 1}}) is False
    assert await worker.request_answer("ask.d", msg.id, msg.lease, 1) is None  # unaffected
    with pytest.raises(PayloadTooLarge):
        await caller.answer(call_id, 1, {"action": "accept", "content": {"x": "y" * 70_000}})
    assert await stranger.requests([call_id]) == []
    assert await caller.requests([call_id]) == [call_id]
    mine = await caller.request(call_id)
    assert mine is not None and mine.request == {"message": "secret?"} and mine.kind == "elicit"
    assert await caller.answer(call_id, 2, {"action": "decline"}) is False  # not the pending question
    assert await caller.answer(call_id, 1, {"action": "decline"}) is True
    assert await caller.answer(call_id, 1, {"action": "accept"}) is False  # answered once
    assert await worker.request_answer("ask.d", msg.id, msg.lease, 1) == {"action": "decline"}


HOSTILE_QUESTIONS: list[tuple[str, Any, str]] = [
    ("elicit", {"message": "m", "requestedSchema": {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}}}}}, "field 'a' has type 'object'"),
    ("elicit", {"message": "m", "requestedSchema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(a+)+$"}}}}, "keywords an elicitation may not use: pattern"),
    ("elicit", {"message": "m", "requestedSchema": {"type": "object", "properties": {
        f"f{i}": {"type": "string"} for i in range(51)}}}, "more than 50"),
    ("elicit", {"message": "m", "requestedSchema": {"type": "object", "properties": {
        "a": {"type": "string", "enum": [str(i) for i in range(101)]}}}}, "enum is not a list"),
    ("elicit", {"message": "m", "requestedSchema": {"type": "object", "$ref": "http://evil/schema",
                                                     "properties": {"a": {"type": "string"}}}}, "$ref"),
    ("elicit", {"message": "m" * 5000, "requestedSchema": SIZE}, "message of at most 4000"),
    ("sample", {"messages": [{"role": "system", "content": {"type": "text", "text": "x"}}], "maxTokens": 5},
     "user or assistant text"),
    ("sample", {"messages": [{"role": "user", "content": {"type": "text", "text": "x"}}], "maxTokens": 5,
                "tools": []}, "does not forward: tools"),
]


async def test_the_gateway_refuses_hostile_questions_and_the_client_never_sees_them(hub: Hub) -> None:
    """A worker role posts questions by hand that MCP does not allow: the gateway answers each "unavailable"
    with the reason (the worker is not left waiting), and the client is never asked."""
    env = hub.env
    _, worker = await env.worker(["hostile.ask"])
    await worker.register_tool("hostile.ask", "", {"name": "hostile_ask", "description": "d",
                                                   "input_schema": {"type": "object"}})
    await worker.heartbeat(["hostile.ask"], "w", 60_000)

    async def known() -> bool:
        await hub.engine.refresh()
        return any(r.name == "hostile_ask" and r.live_workers for r in hub.engine.tools())

    await wait_for(known)
    asked: list[Any] = []

    async def asker(kind: str, request: dict[str, Any], seconds: float) -> dict[str, Any]:
        asked.append(request)
        return {"action": "decline"}

    engine: Engine = hub.engine
    for kind, question, words in HOSTILE_QUESTIONS:
        async with anyio.create_task_group() as tg:
            outcome: list[Any] = []

            async def call(outcome: list[Any] = outcome) -> None:
                outcome.append(await engine.call("hostile_ask", {}, asker=asker, time_limit=20))

            tg.start_soon(call)
            claimed: list[Any] = []
            with anyio.fail_after(15):
                while not claimed:
                    claimed = await worker.dequeue("hostile.ask", "w", 1, 60_000)
                    await anyio.sleep(0.01)
            msg = claimed[0]
            seq = await worker.request("hostile.ask", msg.id, msg.lease, kind, question)
            answer = None
            with anyio.fail_after(15):
                while answer is None:
                    answer = await worker.request_answer("hostile.ask", msg.id, msg.lease, seq)  # type: ignore[arg-type]
                    await anyio.sleep(0.05)
            assert answer["action"] == "unavailable" and words in answer["message"], (words, answer)
            assert await worker.respond("hostile.ask", msg.id, msg.lease, {"ok": True})
        assert outcome[0].kind == "ok"
    assert asked == []


async def test_a_question_whose_notify_was_lost_is_found_on_the_timer(env: Env) -> None:
    """The question is written without its NOTIFY (as if the gateway's LISTEN connection had dropped it): the
    gateway's slow look finds it, asks, and the worker gets the answer."""
    async with hub_for(env, toolset=TOOLS, extra_streams=["hostile.lost"], recheck_interval=0.5) as hub:
        _, worker = await env.worker(["hostile.lost"])
        await worker.register_tool("hostile.lost", "", {"name": "lost_notify", "description": "d",
                                                        "input_schema": {"type": "object"}})
        await worker.heartbeat(["hostile.lost"], "w", 60_000)

        async def known() -> bool:
            await hub.engine.refresh()
            return any(r.name == "lost_notify" and r.live_workers for r in hub.engine.tools())

        await wait_for(known)
        asked: list[Any] = []

        async def asker(kind: str, request: dict[str, Any], seconds: float) -> dict[str, Any]:
            asked.append(request)
            return {"action": "accept", "content": {"size": "S"}}

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: hub.engine.call("lost_notify", {}, asker=asker, time_limit=30))
            claimed: list[Any] = []
            with anyio.fail_after(15):
                while not claimed:
                    claimed = await worker.dequeue("hostile.lost", "w", 1, 60_000)
                    await anyio.sleep(0.01)
            msg = claimed[0]
            question = {"message": "Which size?", "requestedSchema": SIZE}
            await env.admin.execute(
                f'INSERT INTO "{env.schema}".requests (call_id, lease, kind, request) '
                f'SELECT call_id, lease, $2, $3::jsonb FROM "{env.schema}".messages WHERE id = $1', msg.id, "elicit",
                json.dumps(question))
            answer = None
            with anyio.fail_after(15):
                while answer is None:
                    answer = await worker.request_answer("hostile.lost", msg.id, msg.lease, 1)
                    await anyio.sleep(0.05)
            assert answer == {"action": "accept", "content": {"size": "S"}}
            assert asked == [question]
            assert await worker.respond("hostile.lost", msg.id, msg.lease, {"ok": True})
