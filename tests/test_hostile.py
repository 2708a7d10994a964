"""Hostile input: what agents, handlers and workers may send, and what each party is told.

Agents: random JSON against each example tool's schema (hypothesis), arguments that are no object, deep
nesting, sizes past the limits, ``\\u0000`` (PostgreSQL's jsonb refuses it) and lone surrogates, numbers out of
range, unknown and odd tool names, raw malformed JSON-RPC. Handlers: results that are not JSON, break their
declared output schema, or that the database refuses. Workers: tool registrations with invalid names, invalid
or huge schemas, on a stream they may not use. A caller role writing to the queue directly: arguments Python
cannot read back. Each gets a clear, specific error to the right party, nothing half-written stays in the
database, and the server keeps serving.

Hypothesis runs in a worker thread (it cannot drive an event loop that is already running); each example
calls back into the test's loop with ``anyio.from_thread.run``. Few examples and no deadline keep it fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.from_thread
import asyncpg
import httpx2
import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mcp import Client, MCPError
from mcp.types import INVALID_PARAMS

from mcp_hotmesh._streams import CallerAPI
from mcp_hotmesh._tools import ToolSet
from mcp_hotmesh.errors import HotMeshError, InvalidInput, PayloadTooLarge, PermissionDenied
from mcp_hotmesh.examples import Sum
from mcp_hotmesh.examples import toolset as example_tools
from tests.helpers import TOKEN, Env, Hub, http_client, http_server, hub_for, text_of, wait_for

pytestmark = pytest.mark.anyio

# ------------------------------------------------------------------------------------------------- tools
tools = ToolSet(list(example_tools.tools))
OUT = "hostile.out"


def nested(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@tools.tool(topic="hostile.anything", name="hostile_anything")
async def anything(data: Any = None) -> dict[str, Any]:
    """Return whatever it was given, as {"data": ...}."""
    return {"data": data}


@tools.tool(topic=OUT, workflow_name="not_json", name="hostile_out_not_json")
async def not_json() -> Any:
    """Returns something that is not JSON."""
    return {"when": object()}


@tools.tool(topic=OUT, workflow_name="wrong_shape", name="hostile_out_wrong_shape")
async def wrong_shape() -> Sum:
    """Returns something that breaks its declared output schema."""
    return {"result": "seven"}  # type: ignore[return-value]  # on purpose: what the test is about


@tools.tool(topic=OUT, workflow_name="nul", name="hostile_out_nul")
async def nul() -> dict[str, str]:
    """Returns a string with a NUL character, which PostgreSQL's jsonb refuses."""
    return {"text": "a\u0000b"}


@tools.tool(topic=OUT, workflow_name="surrogate", name="hostile_out_surrogate")
async def surrogate() -> dict[str, str]:
    """Returns a string with a lone surrogate, which is no UTF-8."""
    return {"text": "a\ud800b"}


@tools.tool(topic=OUT, workflow_name="nan", name="hostile_out_nan")
async def nan() -> dict[str, float]:
    """Returns NaN, which JSON has no word for."""
    return {"x": float("nan")}


@tools.tool(topic=OUT, workflow_name="huge", name="hostile_out_huge")
async def huge() -> dict[str, str]:
    """Returns more than the database's payload limit."""
    return {"text": "x" * 200_000}


@tools.tool(topic=OUT, workflow_name="deep", name="hostile_out_deep")
async def deep() -> dict[str, Any]:
    """Returns a value nested far deeper than any JSON parser here reads."""
    return {"value": nested(5000)}


STREAMS = list(tools.topics)
ARGS_LIMIT = 65_536
PAYLOAD_LIMIT = 100_000  # the database's max_payload_bytes in these tests


@pytest.fixture
async def hub(env: Env) -> AsyncIterator[Hub]:
    """These tools behind a gateway that takes at most ``ARGS_LIMIT`` bytes of arguments, on a database that takes
    at most ``PAYLOAD_LIMIT``; its caller may also use hostile.reg."""
    await env.set("max_payload_bytes", PAYLOAD_LIMIT)
    async with hub_for(env, toolset=tools, extra_streams=["hostile.reg"], max_args_bytes=ARGS_LIMIT) as h:
        yield h


async def in_thread(run: Callable[[], None]) -> None:
    """Run a hypothesis test (a blocking function) in a worker thread; it reaches the loop with from_thread."""
    await anyio.to_thread.run_sync(run, abandon_on_cancel=True)


HYPOTHESIS = settings(max_examples=25, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# what a model might send: the right keys with any values, wrong keys, nothing
keys = st.sampled_from(["text", "a", "b", "seconds", "steps", "data", "extra", ""]) | st.text(max_size=6)
random_arguments = st.dictionaries(keys, json_values, max_size=4)


# ------------------------------------------------------------------------------------------------ agents
@pytest.mark.parametrize("tool", [t.name for t in example_tools.tools])
async def test_random_json_against_each_example_tool(hub: Hub, tool: str) -> None:
    """Valid arguments are answered; invalid ones are refused before anything is queued, saying what is wrong."""
    schema = next(t.input_schema for t in example_tools.tools if t.name == tool)
    validator = jsonschema.Draft202012Validator(schema)
    valid_arguments = {
        "echo": st.fixed_dictionaries({"text": st.text(max_size=50)}),
        "sleep": st.fixed_dictionaries({}, optional={"seconds": st.floats(0, 0.05), "steps": st.integers(1, 3)}),
        "math_add": st.fixed_dictionaries({"a": st.floats(-1e300, 1e300) | st.integers(-(10**15), 10**15),
                                           "b": st.floats(-1e300, 1e300) | st.integers(-(10**15), 10**15)}),
        "math_multiply": st.fixed_dictionaries({"a": st.floats(-1e300, 1e300), "b": st.floats(-1e300, 1e300)}),
        "flaky": st.nothing(),  # its valid call takes a retry: covered in test_gateway
    }[tool]
    async with Client(hub.gateway.server) as client:

        async def call(args: dict[str, Any]) -> None:
            before = await hub.rows()
            result = await client.call_tool(tool, args)
            text = text_of(result)
            if not validator.is_valid(args):
                assert result.is_error and text.startswith(f"Invalid arguments for {tool!r}: "), text
                assert await hub.rows() == before  # refused before anything was queued
                return
            if "\\u0000" in json.dumps(args):  # valid to the schema, refused by PostgreSQL's jsonb
                assert result.is_error and "refused the arguments" in text and "\\u0000" in text, text
                assert await hub.rows() == before
                return
            assert await hub.rows() == before + 1 and await hub.unfinished() == 0
            if tool == "echo":
                assert result.structured_content == {"text": args["text"], "length": len(args["text"])}
            elif tool.startswith("math_"):
                value = args["a"] + args["b"] if tool == "math_add" else args["a"] * args["b"]
                if math.isfinite(value):
                    assert not result.is_error, text
                    # jsonb keeps numbers as decimals: 6.7e16 may come back as the integer it equals
                    assert result.structured_content is not None
                    assert float(result.structured_content["result"]) == float(value)
                else:  # a finite input, an infinite answer: JSON cannot carry it
                    assert result.is_error and "result was refused" in text, text
            else:
                assert not result.is_error, text

        @HYPOTHESIS
        @given(args=valid_arguments | random_arguments)
        def check(args: dict[str, Any]) -> None:
            if tool == "sleep" and validator.is_valid(args):
                assume(float(args.get("seconds", 1.0)) <= 0.05 and int(args.get("steps", 4)) <= 3)
            if tool == "flaky":
                assume(not validator.is_valid(args))
            anyio.from_thread.run(call, args)

        await in_thread(check)
        await hub.still_serving(client)


async def test_unknown_and_odd_tool_names(hub: Hub) -> None:
    listed = {t.name for t in tools.tools}
    async with Client(hub.gateway.server) as client:

        async def call(name: str) -> None:
            with pytest.raises(MCPError) as exc:
                await client.call_tool(name, {})
            assert exc.value.code == INVALID_PARAMS
            assert exc.value.message.startswith("Unknown tool: ") and len(exc.value.message) < 200
            assert "List the tools again" in exc.value.message

        @HYPOTHESIS
        @given(name=st.text(max_size=300) | st.sampled_from(
            ["", " ", "../../etc/passwd", "echo\n", "echo ", "ECHO", "echo\u0000", "é" * 1000, "x" * 100_000,
             "'; DROP TABLE messages; --", "%s%n", "\u202eohce", "math.add", "math/add"]))
        def check(name: str) -> None:
            assume(name not in listed)
            anyio.from_thread.run(call, name)

        await in_thread(check)
        await hub.still_serving(client)
    assert await hub.rows() == 1  # only the last echo


async def test_nul_and_lone_surrogates_in_arguments(hub: Hub) -> None:
    async with Client(hub.gateway.server) as client:
        nul_ = await client.call_tool("echo", {"text": "a\u0000b"})
        lone = await client.call_tool("echo", {"text": "a\ud800b"})
        nested_nul = await client.call_tool("hostile_anything", {"data": {"deep": ["ok", {"k\u0000": 1}]}})
        assert nul_.is_error and "\\u0000" in text_of(nul_) and "refused the arguments" in text_of(nul_)
        assert nested_nul.is_error and "\\u0000" in text_of(nested_nul)
        assert lone.is_error and "not valid JSON" in text_of(lone)
        assert await hub.rows() == 0
        await hub.still_serving(client)


async def test_numbers_out_of_range(hub: Hub) -> None:
    async with Client(hub.gateway.server) as client:
        # past float range: the worker's own check refuses it, and says so (never retried)
        big = await client.call_tool("math_add", {"a": 10**400, "b": 1})
        assert big.is_error and "invalid arguments: a: Input should be a valid number" in text_of(big), text_of(big)
        # past Python's int conversion limit: refused before anything is queued
        huge = await client.call_tool("hostile_anything", {"data": 10**5000})
        assert huge.is_error and "not valid JSON" in text_of(huge)
        # NaN and infinities travel as null in MCP's JSON, and the schema says what it wants instead
        nan_ = await client.call_tool("math_add", {"a": float("nan"), "b": 1})
        assert nan_.is_error and "a: None is not of type 'number'" in text_of(nan_)
        exact = await client.call_tool("hostile_anything", {"data": [2**63, -(2**63) - 1, 1e-300, 10**300]})
        assert exact.structured_content == {"data": [2**63, -(2**63) - 1, 1e-300, 10**300]}
        await hub.still_serving(client)
    assert await hub.rows("state = 'dead'") == 0 and await hub.unfinished() == 0


async def test_sizes_past_the_limits(hub: Hub) -> None:
    async with Client(hub.gateway.server) as client:
        long_text = await client.call_tool("echo", {"text": "x" * (ARGS_LIMIT + 1)})
        long_array = await client.call_tool("hostile_anything", {"data": list(range(20_000))})
        assert long_text.is_error and f"this server accepts at most {ARGS_LIMIT}" in text_of(long_text)
        assert long_array.is_error and f"this server accepts at most {ARGS_LIMIT}" in text_of(long_array)
        assert await hub.rows() == 0
        # under the gateway's limit but over the database's: the database refuses, nothing is written
        await hub.env.set("max_payload_bytes", 1000)
        try:
            db_refused = await client.call_tool("echo", {"text": "y" * 2000})
        finally:
            await hub.env.set("max_payload_bytes", PAYLOAD_LIMIT)
        assert db_refused.is_error and "larger than the tool service accepts" in text_of(db_refused)
        assert await hub.rows() == 0
        # just under the limit: fine
        fits = await client.call_tool("echo", {"text": "z" * (ARGS_LIMIT - 100)})
        assert not fits.is_error
        await hub.still_serving(client)


async def test_deep_nesting(hub: Hub) -> None:
    async with Client(hub.gateway.server) as client:
        fine = await client.call_tool("hostile_anything", {"data": nested(100)})
        assert fine.structured_content == {"data": nested(100)}
        wrong = await client.call_tool("echo", {"text": nested(200)})
        assert wrong.is_error and "is not of type 'string'" in text_of(wrong) and len(text_of(wrong)) < 1000
        await hub.still_serving(client)
    # past what MCP's JSON parser reads: a parse error on the wire (test_raw_json_rpc), and the engine refuses too
    outcome = await hub.engine.call("hostile_anything", {"data": nested(5000)})
    assert outcome.error is not None and "nested too deeply" in outcome.error, outcome.error
    assert await hub.unfinished() == 0


# --------------------------------------------------------------------------------------------- raw JSON-RPC
@pytest.fixture
async def http_url(hub: Hub) -> AsyncIterator[str]:
    async with http_server(hub.gateway) as url:
        yield f"{url}/mcp"


def _reply(response: httpx2.Response) -> dict[str, Any]:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return dict(json.loads(data[-1]))
    return dict(response.json())


async def test_raw_json_rpc(hub: Hub, http_url: str) -> None:
    """Requests no SDK client would send, straight onto the HTTP transport."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with http_client(TOKEN) as http:
        init = await http.post(http_url, headers=headers, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
        assert init.status_code == 200
        headers |= {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        await http.post(http_url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})

        async def send(body: str) -> tuple[int, dict[str, Any]]:
            with anyio.fail_after(20):
                response = await http.post(http_url, headers=headers, content=body.encode())
            return response.status_code, _reply(response)

        def call(args: str, name: str = '"echo"') -> str:
            return f'{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":{name},"arguments":{args}}}}}'

        cases = {
            "arguments a list": (call("[1, 2]"), 200, -32602, None),
            "arguments a string": (call('"text"'), 200, -32602, None),
            "name a number": (call("{}", name="7"), 200, -32602, None),
            "params a string": ('{"jsonrpc":"2.0","id":7,"method":"tools/call","params":"x"}', 400, -32602, None),
            "not JSON": ("not json", 400, -32700, None),
            "truncated": (call('{"text": "abc'), 400, -32700, None),
            "nested 5000 deep": (call('{"text":' + "[" * 5000 + "]" * 5000 + "}"), 400, -32700, "recursion"),
            "lone surrogate": (call('{"text":"\\udc00"}'), 400, -32700, "escape"),
            "5000 digits": (call('{"data":' + "9" * 5000 + "}", name='"hostile_anything"'), 400, -32700, "range"),
            "NaN": (call('{"text":NaN}'), 200, None, "not valid JSON"),
            "1e400": (call('{"a":1e400,"b":1}', name='"math_add"'), 200, None, "not valid JSON"),
            "NUL": (call('{"text":"\\u0000"}'), 200, None, "\\u0000"),
        }
        for case, (body, status, code, words) in cases.items():
            got_status, reply = await send(body)
            assert got_status == status, (case, reply)
            if code is not None:
                assert reply["error"]["code"] == code, (case, reply)
                if words:
                    assert words in reply["error"]["message"], (case, reply)
            else:
                assert reply["result"]["isError"] is True and words in reply["result"]["content"][0]["text"], case
        assert await hub.rows() == 0
        status, reply = await send(call('{"text":"after all that"}'))
        assert status == 200 and reply["result"]["structuredContent"] == {"text": "after all that", "length": 14}


# ----------------------------------------------------------------------------------------------- handlers
async def test_handler_results_that_are_not_json_or_break_their_schema(hub: Hub) -> None:
    """The caller is told at once what was wrong with the result; the call is not retried; nothing is left."""
    expected = {
        "hostile_out_not_json": "returned an invalid result",
        "hostile_out_wrong_shape": "returned an invalid result",
        "hostile_out_nul": "the tool's result was refused: the database refused a value",
        "hostile_out_surrogate": "the tool's result was refused",
        "hostile_out_nan": "the tool's result was refused",
        "hostile_out_huge": f"the tool's result was refused: result larger than {PAYLOAD_LIMIT} bytes",
        "hostile_out_deep": "returned an invalid result",
    }
    async with Client(hub.gateway.server) as client:
        for name, words in expected.items():
            with anyio.fail_after(15):
                result = await client.call_tool(name, {})
            assert result.is_error and words in text_of(result), (name, text_of(result))
            assert "Traceback" not in text_of(result)
        await hub.still_serving(client)
    rows = await hub.env.admin.fetch(
        f'SELECT workflow_name, state, attempt, is_error FROM "{hub.env.schema}".messages WHERE stream = $1', OUT)
    assert len(rows) == len(expected)
    assert all((r["state"], r["attempt"], r["is_error"]) == ("done", 0, True) for r in rows), rows


# ------------------------------------------------------------------------------------------------ workers
async def test_tool_registrations_that_are_refused(hub: Hub) -> None:
    env = hub.env
    _, worker = await env.worker(["hostile.reg"])

    def tool(**fields: Any) -> dict[str, Any]:
        return {"name": "reg_tool", "description": "d", "input_schema": {"type": "object"}, **fields}

    async def refused(registration: Any, error: type[HotMeshError], words: str, stream: str = "hostile.reg") -> None:
        before = await env.admin.fetch(f'SELECT * FROM "{env.schema}".tools ORDER BY name')
        with pytest.raises(error) as exc:
            await worker.register_tool(stream, "", registration)
        assert words in exc.value.message, exc.value.message
        assert await env.admin.fetch(f'SELECT * FROM "{env.schema}".tools ORDER BY name') == before

    for name in ("", "bad name", "x" * 65, "名前", "a.b", "a/b", None, 7, ["echo"]):
        await refused(tool(name=name), InvalidInput, "tool name must match")
    await refused(tool(name="a\u0000b"), InvalidInput, "refused a value")
    await refused(tool(input_schema="object"), InvalidInput, "input_schema must be a JSON Schema object")
    await refused(tool(input_schema={"type": "string"}), InvalidInput, "input_schema must be a JSON Schema object")
    await refused(tool(output_schema=[1]), InvalidInput, "output_schema must be a JSON Schema object")
    await refused(tool(description=None), InvalidInput, "description must be a string")
    await refused(["not", "an", "object"], InvalidInput, "tool must be a JSON object")
    await refused(tool(input_schema={"type": "object", "description": "x" * 300_000}), PayloadTooLarge,
                  "tool registration larger than")
    await refused(tool(name="echo"), InvalidInput, "another stream already serves a tool with this name")
    await refused(tool(), PermissionDenied, "permission denied for stream 'echo'", stream="echo")
    await refused(tool(), PermissionDenied, "permission denied", stream="not a stream!")

    # A schema that is a JSON object but no valid JSON Schema: the database cannot tell, the gateway can. It is
    # left out of tools/list (a host may refuse a whole tool list for one bad schema) and a call says why.
    bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}
    assert await worker.register_tool("hostile.reg", "", tool(name="bad_schema", input_schema=bad))
    await worker.heartbeat(["hostile.reg"], "w", 60_000)

    async def known() -> bool:
        await hub.engine.refresh()
        return "bad_schema" in {r.name for r in hub.engine.tools()}

    await wait_for(known)
    async with Client(hub.gateway.server) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "bad_schema" not in names and "echo" in names
        result = await client.call_tool("bad_schema", {"n": 1})
        assert result.is_error and "its registered input schema is invalid" in text_of(result)
        await hub.still_serving(client)
    assert await hub.rows("stream = 'hostile.reg'") == 0


# ----------------------------------------------------------------------------------- the queue, written by hand
async def test_messages_python_cannot_read_are_refused_and_spare_their_batch(hub: Hub) -> None:
    """A caller role may write any jsonb with caller_call within max_json_depth. With a 5000-digit number it is
    valid to PostgreSQL but not readable by Python: the worker answers it with a clear error, and the messages
    claimed in the same batch are answered as usual (one unreadable value must not make a batch unreadable)."""
    env = hub.env
    role = await env.provision(["hostile.anything"], "caller")
    conn = await env.connect(role)
    try:
        sql = f"SELECT {env.schema}.caller_call('hostile.anything', '', $1::text::jsonb, 20000)"
        # too deep for any reader: refused at the door (max_json_depth), not queued
        with pytest.raises(asyncpg.PostgresError, match="nested deeper than"):
            await conn.fetchval(sql, '{"data": ' + "[" * 5000 + "]" * 5000 + "}")
        ids = [await conn.fetchval(sql, body) for body in ('{"data": 1}', '{"data": 1e5000}', '{"data": 2}')]
    finally:
        await conn.close()
    caller = CallerAPI(await env.pool(role), env.schema)

    async def all_finished() -> bool:
        return all([(await caller.result(i)).finished for i in ids])

    await wait_for(all_finished, 15)
    first, digits, last = [await caller.result(i) for i in ids]
    assert (first.state, first.result) == ("done", {"data": 1})
    assert (last.state, last.result) == ("done", {"data": 2})
    assert digits.state == "done" and digits.is_error and "too many digits" in json.dumps(digits.result), digits
    assert await hub.rows("reclaims > 0") == 0
    async with Client(hub.gateway.server) as client:
        await hub.still_serving(client)
