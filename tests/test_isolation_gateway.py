"""A worker role attacks every gateway that serves its stream through its tool registrations (issue #9).

The attacker holds a worker role for one stream, ``alpha``, and registers tools whose definitions are hostile:
schemas Python cannot read back (nested 5,000 deep, a 5,000-digit number), nested past the limits, with more
values than the limits, that are no JSON Schema object, descriptions of 1 MB, and ``$ref``s to a file on the
gateway's host and to a local server that accepts connections and never answers. Whatever the database still
accepts goes in through ``worker_register_tool`` as the worker role; what it refuses (its limits grow by
migration) is written into the tools table as admin, as a row registered before those limits existed.

Each time the gateway, an in-process ``McpGateway`` behind a real ``mcp.Client``, starts and keeps serving: the
good tools of the other streams are listed and answer, the hostile tool is left out with one log line and a call
to it gets a clear error, nothing is fetched (the server sees no connection, the file's content appears in no
text), and the event loop keeps answering while large schemas are checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.abc
import asyncpg
import pytest
from mcp import Client
from mcp.types import CallToolResult
from pydantic import BaseModel, Field

from mcp_hotmesh import _schemas as schemas
from mcp_hotmesh._caller import Engine
from mcp_hotmesh._mcp_server import McpGateway
from mcp_hotmesh._tools import ToolSet
from mcp_hotmesh.examples import toolset as example_tools
from tests.helpers import Env, Hub, hub_for, text_of, wait_for

pytestmark = pytest.mark.anyio

ALPHA = "alpha"  # the attacker's stream


class Point(BaseModel):
    x: int
    y: int


tools = ToolSet(list(example_tools.tools))


@tools.tool(topic="iso.shape", name="iso_shape")
async def shape(name: str, points: list[Point]) -> dict[str, Any]:
    """Count the points of a named shape (its schema has $defs and #/$defs/... references, as pydantic makes)."""
    return {"name": name, "points": len(points)}


@tools.tool(topic="iso.codes", name="iso_codes")
async def codes(code: Annotated[str, Field(pattern=r"^[A-Z]{3}-\d+$")],
                tags: tuple[Annotated[str, Field(pattern="^[a-z]+$")], ...] = ()) -> dict[str, Any]:
    """Return a product code and its tags (its schema has pydantic's pattern constraints)."""
    return {"code": code, "tags": list(tags)}


GOOD = {t.name for t in tools.tools}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def properties(count: int, schema: str = '{"type": "string"}') -> str:
    return '{"type": "object", "properties": {' + ", ".join(f'"p{i}": {schema}' for i in range(count)) + "}}"


def hostile_tools(secret_file: Path, port: int) -> dict[str, dict[str, str]]:
    """Tool name -> the JSON text of its registration fields (input_schema, output_schema, description)."""
    deep_schema = '{"type": "object"}'
    for _ in range(20):  # 20 levels of a real-looking schema: 41 levels of JSON, past the limit of 32
        deep_schema = '{"type": "object", "properties": {"a": ' + deep_schema + "}}"
    return {
        "unreadable_nesting": {"input_schema": '{"type": "object", "default": ' + nested(5000) + "}"},
        "unreadable_number": {"input_schema": '{"type": "object", "maximum": 1' + "0" * 5000 + "}"},
        "nested_300": {"input_schema": '{"type": "object", "default": ' + nested(300) + "}"},
        "nested_schema": {"input_schema": deep_schema},
        "many_values": {"input_schema": properties(7000)},
        "deep_output": {"input_schema": '{"type": "object"}',
                        "output_schema": '{"type": "object", "default": ' + nested(5000) + "}"},
        "not_an_object": {"input_schema": '"object"'},
        "an_array": {"input_schema": "[1, 2]"},
        "null_schema": {"input_schema": "null"},
        "string_type": {"input_schema": '{"type": "string"}'},
        "array_output": {"input_schema": '{"type": "object"}', "output_schema": "[1]"},
        "huge_description": {"input_schema": '{"type": "object"}', "description": json.dumps("d" * 1_000_000)},
        "file_ref": {"input_schema": json.dumps(
            {"type": "object", "properties": {"x": {"$ref": secret_file.as_uri()}}})},
        "http_ref": {"input_schema": json.dumps(
            {"type": "object", "$ref": f"http://127.0.0.1:{port}/schema.json"})},
        "dynamic_ref": {"input_schema": json.dumps(
            {"type": "object", "properties": {"x": {"$dynamicRef": f"http://127.0.0.1:{port}/d.json#meta"}}})},
        "relative_ref": {"input_schema": json.dumps(
            {"$id": f"http://127.0.0.1:{port}/root.json", "type": "object",
             "properties": {"x": {"$ref": "other.json"}}})},
        "not a name": {"input_schema": '{"type": "object"}'},  # the database refuses the name
    }


class Silent:
    """A local server that accepts connections and never answers: a fetch of it would hang, so any attempt shows."""

    def __init__(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        self.listener = listener
        self.port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.connections = 0

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with stream:
            await anyio.sleep_forever()


async def plant(env: Env, attacker: asyncpg.Connection, name: str, fields: dict[str, str]) -> str:
    """Register ``name`` on alpha as the attacker's worker role; if the database refuses the registration, write the
    row as admin (a row from before the refusing limit). Returns which of the two happened."""
    description = fields.get("description", '"hostile"')
    output = fields.get("output_schema", "null")
    registration = (f'{{"name": {json.dumps(name)}, "description": {description}, '
                    f'"input_schema": {fields["input_schema"]}, "output_schema": {output}}}')
    s = env.schema
    try:
        await attacker.fetchval(f'SELECT "{s}".worker_register_tool($1, $2, $3::text::jsonb)', ALPHA, name,
                                registration)
        return "registered"
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == "42501":  # the attacker's own stream: never a permission problem
            raise
    await env.admin.execute(
        f'INSERT INTO "{s}".tools (stream, workflow_name, name, description, input_schema, output_schema, '
        f"registered_by) VALUES ($1, $2, $2, $3::text::jsonb #>> '{{}}', $4::text::jsonb, "
        "nullif($5::text::jsonb, 'null'), current_user)",
        ALPHA, name, description, fields["input_schema"], output)
    await env.admin.execute(f"SELECT pg_notify('{s}_tools', '')")
    return "planted"


@dataclass
class Iso:
    """The hub serving these tools, whose caller may also use alpha; the attacker's session on alpha."""

    hub: Hub
    attacker: asyncpg.Connection
    silent: Silent
    secret_path: str
    secret: str

    @property
    def env(self) -> Env:
        return self.hub.env

    @property
    def engine(self) -> Engine:
        return self.hub.engine

    @property
    def gateway(self) -> McpGateway:
        return self.hub.gateway

    async def plant(self, name: str, fields: dict[str, str]) -> str:
        """``plant`` as this hub's attacker."""
        return await plant(self.env, self.attacker, name, fields)

    async def known(self, names: set[str]) -> None:
        """Wait until the engine's catalog holds ``names`` (listed or not)."""

        async def there() -> bool:
            await self.engine.refresh()
            return names <= {r.name for r in self.engine.tools()}

        await wait_for(there, 30)

    async def serves_the_good_tools(self, client: Client) -> set[str]:
        """tools/list still answers with every good tool, and a good tool of another stream still answers."""
        listed = {t.name for t in (await client.list_tools()).tools}
        assert listed >= GOOD, GOOD - listed
        await self.hub.still_serving(client)
        return listed

    def hostile(self) -> dict[str, dict[str, str]]:
        return hostile_tools(Path(self.secret_path), self.silent.port)

    def clean(self, text: str) -> None:
        """No file content and no internals in what an agent reads."""
        for leak in (self.secret, "Traceback", "UnreadableJSON", "SELECT", self.env.schema, "Errno"):
            assert leak not in text, text


@pytest.fixture
def secret_file(tmp_path: Path) -> tuple[Path, str]:
    """A JSON file on the gateway's host, holding a secret and shaped like a schema (so a fetch would succeed)."""
    secret = "s3cr3t-" + tmp_path.name
    path = tmp_path / "secret.json"
    path.write_text(json.dumps({"type": "string", "description": secret, "const": secret}))
    return path, secret


@contextlib.asynccontextmanager
async def iso_hub(env: Env, secret_file: tuple[Path, str], *, plant_first: bool = False) -> AsyncIterator[Iso]:
    """The example tools served by a real worker, a gateway for them and alpha, and the attacker's connection.
    With ``plant_first`` every hostile tool (and one with a name the database refuses) is in the tools table
    before the gateway starts."""
    attacker_role = await env.provision([ALPHA], "worker")
    attacker = await env.connect(attacker_role)
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, \
            anyio.create_task_group() as tg:
        silent = Silent(listener)
        tg.start_soon(listener.serve, silent.handle)
        try:
            if plant_first:
                for name, fields in hostile_tools(secret_file[0], silent.port).items():
                    await plant(env, attacker, name, fields)
            async with hub_for(env, toolset=tools, extra_streams=[ALPHA], max_args_bytes=1 << 20) as hub:
                yield Iso(hub, attacker, silent, str(secret_file[0]), secret_file[1])
        finally:
            await attacker.close()
            tg.cancel_scope.cancel()


# -------------------------------------------------------------------------------------------------- tests
async def test_the_gateway_starts_and_serves_whatever_the_tools_table_holds(
        env: Env, secret_file: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    """Every hostile row is there before the gateway starts: it starts, lists the good tools only, and says once
    per hostile tool why it is left out (not once per tools/list or refresh)."""
    caplog.set_level(logging.WARNING, logger="mcp_hotmesh._caller")
    async with iso_hub(env, secret_file, plant_first=True) as iso, Client(iso.gateway.server) as client:
        hostile = iso.hostile()
        assert set(hostile) <= {r.name for r in iso.engine.tools()}  # in the catalog, so it was read
        for _ in range(3):
            listed = await iso.serves_the_good_tools(client)
            assert not listed & set(hostile), listed & set(hostile)
            await iso.engine.refresh()
    assert iso.silent.connections == 0
    for name in hostile:
        lines = [r for r in caplog.records if "is not listed" in r.getMessage() and repr(name) in r.getMessage()]
        assert len(lines) == 1, (name, [r.getMessage()[:200] for r in lines])
        assert len(lines[0].getMessage()) < 1000  # a 1 MB description does not end up in the log


async def test_hostile_registrations_while_serving(env: Env, secret_file: tuple[Path, str]) -> None:
    """The attacker registers while the gateway serves. tools/list and the good tools keep working; a call to a
    hostile tool is a clear error; nothing is fetched; no file content reaches the agent."""
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        hostile = hostile_tools(secret_file[0], iso.silent.port)
        how = {name: await iso.plant(name, fields) for name, fields in hostile.items()}
        # the database refuses both now (a $ref must start with #); rows written before that still reach gateways
        assert how["file_ref"] == how["http_ref"] == "planted"
        await iso.known(set(hostile))
        listed = await iso.serves_the_good_tools(client)
        assert not listed & set(hostile), listed & set(hostile)
        for name in hostile:
            result = await client.call_tool(name, {"x": {"y": 1}})
            assert result.is_error, name
            assert f"Tool {name!r} cannot be called: its registered" in text_of(result), text_of(result)
            iso.clean(text_of(result))
        assert "outside itself" in text_of(await client.call_tool("http_ref", {}))
        await iso.serves_the_good_tools(client)
    assert iso.silent.connections == 0


async def test_references_inside_the_schema_resolve_without_any_retrieval(
        env: Env, secret_file: tuple[Path, str]) -> None:
    """References starting with '#' resolve inside the schema, even under an ``$id`` naming the local server; one
    that finds nothing there, or loops, is a clear error for the agent, never a fetch or a crash."""
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        base = f"http://127.0.0.1:{iso.silent.port}"
        local = {"$id": f"{base}/root.json", "type": "object", "$defs": {"n": {"type": "integer"}},
                 "properties": {"a": {"$ref": "#/$defs/n"}}}
        missing = {"$id": f"{base}/root.json", "type": "object",
                   "properties": {"a": {"$id": f"{base}/other.json", "$ref": "#/$defs/nowhere"}}}
        loop = {"type": "object", "$ref": "#"}
        for name, schema in (("local_ref", local), ("missing_ref", missing), ("loop_ref", loop)):
            assert await iso.plant(name, {"input_schema": json.dumps(schema)}) == "registered"
        await iso.known({"local_ref", "missing_ref", "loop_ref"})
        listed = await iso.serves_the_good_tools(client)
        assert "local_ref" in listed  # valid JSON Schema; its references stay inside it

        wrong = await client.call_tool("local_ref", {"a": "seven"})
        assert wrong.is_error and "a: 'seven' is not of type 'integer'" in text_of(wrong), text_of(wrong)
        right = await client.call_tool("local_ref", {"a": 7})  # valid: it got past validation to the queue
        assert right.is_error and "offline" in text_of(right), text_of(right)
        for name in ("missing_ref", "loop_ref"):
            result = await client.call_tool(name, {"a": 1})
            assert result.is_error and "could not be applied to the arguments" in text_of(result), text_of(result)
            iso.clean(text_of(result))
        await iso.serves_the_good_tools(client)
    assert iso.silent.connections == 0


@pytest.mark.filterwarnings("ignore:Automatically retrieving remote references:DeprecationWarning")
async def test_a_file_reference_is_never_read(env: Env, secret_file: tuple[Path, str]) -> None:
    """jsonschema's default retrieval reads the file and only then warns: the filter above lets a regression to it
    show as the file's content in the agent's text, instead of as a warning turned into an error."""
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        schema = {"type": "object", "properties": {"x": {"$ref": secret_file[0].as_uri()}}}
        await iso.plant("file_ref", {"input_schema": json.dumps(schema)})
        await iso.known({"file_ref"})
        for arguments in ({"x": 1}, {"x": secret_file[1]}, {}):
            result = await client.call_tool("file_ref", arguments)
            assert result.is_error
            iso.clean(text_of(result))
        assert "file_ref" not in await iso.serves_the_good_tools(client)


@pytest.mark.slow  # schemas of thousands of properties
async def test_large_schemas_are_checked_off_the_event_loop(
        env: Env, secret_file: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """20 schemas of 7,000 properties are refused by the bounds walk; two large valid ones are checked in a worker
    thread, held there by the test: meanwhile tools/list and a good tool answer. Then both are listed."""
    started, release = threading.Event(), threading.Event()
    check = schemas.check

    def held_check(key: str, problem: str | None, input_schema: Any, output_schema: Any) -> schemas.Checked:
        if problem is None and isinstance(input_schema, dict) and len(input_schema.get("properties", {})) >= 3000:
            started.set()
            release.wait(60)
        return check(key, problem, input_schema, output_schema)

    monkeypatch.setattr(schemas, "check", held_check)
    try:
        async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
            for i in range(20):
                # the database refuses them now (max_schema_nodes); rows from before that still reach gateways
                assert await iso.plant(f"wide_{i}", {"input_schema": properties(7000)}) == "planted"
            await iso.known({f"wide_{i}" for i in range(20)})  # refused by the walk: no thread held
            assert not started.is_set()
            assert not {f"wide_{i}" for i in range(20)} & await iso.serves_the_good_tools(client)

            for i in range(2):  # 3,000 properties: 6,000 values, within the limits
                await iso.plant(f"big_{i}", {"input_schema": properties(3000)})
            assert await anyio.to_thread.run_sync(started.wait, 30), "the large schema was never checked"
            listed = await iso.serves_the_good_tools(client)  # while the check is held in its thread
            assert "big_0" not in listed  # nothing listed before it is checked
            release.set()

            async def both_listed() -> bool:
                return {"big_0", "big_1"} <= {t.name for t in (await client.list_tools()).tools}

            await wait_for(both_listed, 60)
            result = await client.call_tool("big_1", {"p1": 5})
            assert result.is_error and "p1: 5 is not of type 'string'" in text_of(result), text_of(result)
    finally:
        release.set()


async def test_a_generated_schema_with_defs_is_listed_and_validated(env: Env, secret_file: tuple[Path, str]) -> None:
    """No regression: pydantic's $defs and #/$defs/... references validate, and the tool answers."""
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        schema = listed["iso_shape"].input_schema
        assert "Point" in schema["$defs"] and "#/$defs/Point" in json.dumps(schema)
        wrong = await client.call_tool("iso_shape", {"name": "tri", "points": [{"x": 1, "y": "two"}]})
        assert wrong.is_error and "points/0/y: 'two' is not of type 'integer'" in text_of(wrong), text_of(wrong)
        result = await client.call_tool("iso_shape", {"name": "tri", "points": [{"x": 0, "y": 0}, {"x": 1, "y": 1}]})
        assert not result.is_error and result.structured_content == {"name": "tri", "points": 2}


def test_the_limits_are_the_ones_the_database_mirrors() -> None:
    assert (schemas.MAX_SCHEMA_DEPTH, schemas.MAX_SCHEMA_NODES, schemas.MAX_DESCRIPTION_CHARS) == (32, 10_000, 10_000)


@pytest.mark.parametrize(("value", "words"), [
    ({"type": "object", "default": json.loads(nested(32))}, "32 levels"),
    ({"type": "object", "enum": list(range(10_000))}, "10000 values"),
    ({"type": "object", "x": {1: 2}}, "not plain JSON"),
    ({"type": "object", "x": float("nan")}, "out of range"),
    ({"type": "object", "x": object()}, "not plain JSON"),
])
def test_measure_refuses(value: Any, words: str) -> None:
    problem = schemas.measure(value, "it")
    assert problem is not None and words in problem, problem


def test_measure_accepts_the_limits_exactly() -> None:
    at_depth: Any = 1
    for _ in range(schemas.MAX_SCHEMA_DEPTH - 1):
        at_depth = [at_depth]
    assert schemas.measure(at_depth, "it") is None
    assert schemas.measure(list(range(schemas.MAX_SCHEMA_NODES - 1)), "it") is None
    assert schemas.measure(list(range(schemas.MAX_SCHEMA_NODES)), "it") is not None


# ----------------------------------------------------------------------------- the cost of checking arguments
def doubling(depth: int) -> dict[str, Any]:
    """Each $defs entry applies the next one twice (allOf of two $refs): checking any value costs 2 ** depth.
    Within every registration limit (about 7 values a level); 16 levels took 1.7 s, 25 would take minutes."""
    defs: dict[str, Any] = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
                            for i in range(depth)}
    defs[f"d{depth}"] = {"type": "integer"}
    return {"type": "object", "title": "doubling", "$defs": defs, "properties": {"x": {"$ref": "#/$defs/d0"}}}


COSTLY = {
    "doubling": doubling(25),
    # Python's re backtracks exponentially on these (30 characters take seconds, 5,000 for ever): RE2 does not
    "backtracking": {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}},
    "backtracking_keys": {"type": "object", "patternProperties": {"^(a+)+$": {"type": "integer"}},
                          "additionalProperties": False},
    # jsonschema compares every pair of unsortable items: 20,000 objects took minutes
    "unique_objects": {"type": "object", "properties": {"items": {"type": "array", "uniqueItems": True}}},
}


@pytest.fixture
def watched_checks(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(started, finished): set when a check of arguments against the ``doubling`` schema starts and ends in a
    worker thread (it runs there once it needs more than the event loop's share of steps)."""
    started, finished = threading.Event(), threading.Event()
    errors = schemas.ArgumentValidator.errors

    def watched(self: schemas.ArgumentValidator, instance: Any, steps: int, **options: Any) -> Any:
        mine = self.schema.get("title") == "doubling" and threading.current_thread() is not threading.main_thread()
        if mine:
            started.set()
        try:
            return errors(self, instance, steps, **options)
        finally:
            if mine:
                finished.set()

    monkeypatch.setattr(schemas.ArgumentValidator, "errors", watched)
    return started, finished


async def test_a_schema_that_doubles_its_work_is_refused_at_a_bounded_cost_while_others_are_served(
        env: Env, secret_file: tuple[Path, str], watched_checks: tuple[threading.Event, threading.Event],
        caplog: pytest.LogCaptureFixture) -> None:
    """The attacker registers the doubling chain (valid JSON Schema, within every limit: it is listed). An agent's
    call to it gets a clear error well within 30 s and nothing is enqueued; while the check runs, in its thread,
    tools/list and a good tool of another stream answer."""
    started, finished = watched_checks
    caplog.set_level(logging.WARNING, logger="mcp_hotmesh._caller")
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        assert await iso.plant("doubling", {"input_schema": json.dumps(COSTLY["doubling"])}) == "registered"
        await iso.known({"doubling"})
        assert "doubling" in await iso.serves_the_good_tools(client)
        result: list[CallToolResult] = []

        async def costly() -> None:  # 300 KB of padding: a budget of 700,000 steps, about 3 s of one core
            result.append(await client.call_tool("doubling", {"x": 1, "pad": "p" * 300_000}))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(costly)
                assert await anyio.to_thread.run_sync(started.wait, 30), "the check never went to its thread"
                await iso.serves_the_good_tools(client)  # while the check spends its budget
                assert not finished.is_set(), "the good call waited for the costly check"
        assert result[0].is_error
        assert "cannot be called with these arguments: they are too costly to check" in text_of(result[0])
        small = await client.call_tool("doubling", {"x": 1})  # 100,000 steps: refused too, in about half a second
        assert small.is_error and "too costly to check" in text_of(small), text_of(small)
        assert await iso.env.admin.fetchval(  # nothing was sent
            f'SELECT count(*) FROM "{env.schema}".messages WHERE stream = $1', ALPHA) == 0
        await iso.serves_the_good_tools(client)
    assert [r for r in caplog.records if "took more than" in r.getMessage() and "'doubling'" in r.getMessage()]


async def test_catastrophic_patterns_and_quadratic_uniqueness_are_checked_in_linear_time(
        env: Env, secret_file: tuple[Path, str]) -> None:
    """Patterns and patternProperties keys that backtrack exponentially in Python's re, and uniqueItems over
    20,000 objects, each called with the argument that hurts, alongside a good tool: each gets the right answer
    (an invalid argument is named, a valid one reaches the queue, where no worker serves alpha) within 30 s."""
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        for name in ("backtracking", "backtracking_keys", "unique_objects"):
            assert await iso.plant(name, {"input_schema": json.dumps(COSTLY[name])}) == "registered"
        await iso.known({"backtracking", "backtracking_keys", "unique_objects"})
        evil = "a" * 5000 + "b"
        calls: list[tuple[str, dict[str, Any], str]] = [
            ("backtracking", {"s": evil}, "does not match '^(a+)+$'"),
            ("backtracking", {"s": "a" * 5000}, "offline"),
            ("backtracking_keys", {evil: 1}, "does not match any of the regexes: '^(a+)+$'"),
            ("backtracking_keys", {"aaa": "one"}, "aaa: 'one' is not of type 'integer'"),
            ("backtracking_keys", {"aaa": 1}, "offline"),
            ("unique_objects", {"items": [{"k": i} for i in range(20_000)]}, "offline"),
            ("unique_objects", {"items": [{"k": 1}, {"k": 2}, {"k": 1.0}]}, "has non-unique elements"),
        ]
        answers: dict[int, str] = {}

        async def call(index: int, name: str, arguments: dict[str, Any]) -> None:
            result = await client.call_tool(name, arguments)
            assert result.is_error  # alpha has no worker: a valid call is offline
            answers[index] = text_of(result)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for index, (name, arguments, _) in enumerate(calls):
                    tg.start_soon(call, index, name, arguments)
                await iso.serves_the_good_tools(client)
        for index, (name, _, words) in enumerate(calls):
            assert words in answers[index], (name, answers[index][:300])


@pytest.mark.parametrize("pattern", ["^(?=a)b", r"(a)\1", r"(?<!x)y"])
async def test_a_pattern_re2_cannot_run_makes_the_tool_unusable(
        env: Env, secret_file: tuple[Path, str], caplog: pytest.LogCaptureFixture, pattern: str) -> None:
    """Lookaround and backreferences (valid for Python's re, so valid JSON Schema here) have no linear-time match:
    the tool is left out of tools/list with one log line, and a call to it says why."""
    caplog.set_level(logging.WARNING, logger="mcp_hotmesh._caller")
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}
        keys = {"type": "object", "patternProperties": {pattern: {}}}
        for name, value in (("lookaround", schema), ("lookaround_keys", keys)):
            assert await iso.plant(name, {"input_schema": json.dumps(value)}) == "registered"
        await iso.known({"lookaround", "lookaround_keys"})
        assert not {"lookaround", "lookaround_keys"} & await iso.serves_the_good_tools(client)
        for name in ("lookaround", "lookaround_keys"):
            result = await client.call_tool(name, {"s": "b"})
            assert result.is_error
            assert "has a pattern this server cannot apply in bounded time" in text_of(result), text_of(result)
            lines = [r for r in caplog.records if "is not listed" in r.getMessage() and repr(name) in r.getMessage()]
            assert len(lines) == 1, [r.getMessage() for r in lines]


async def test_pattern_constraints_of_a_generated_schema_still_validate(
        env: Env, secret_file: tuple[Path, str]) -> None:
    """No regression: pydantic's pattern constraints run on RE2 with the same verdicts, and the tool answers."""
    async with iso_hub(env, secret_file) as iso, Client(iso.gateway.server) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert listed["iso_codes"].input_schema["properties"]["code"]["pattern"] == r"^[A-Z]{3}-\d+$"
        result = await client.call_tool("iso_codes", {"code": "ABC-123", "tags": ["red", "blue"]})
        assert not result.is_error and result.structured_content == {"code": "ABC-123", "tags": ["red", "blue"]}
        for arguments, words in (({"code": "abc-123"}, "code: 'abc-123' does not match '^[A-Z]{3}-\\\\d+$'"),
                                 ({"code": "ABC-123\n"}, "does not match"),  # ECMA's $, not Python's
                                 ({"code": "ABC-1", "tags": ["ok", "Not"]}, "tags/1: 'Not' does not match '^[a-z]+$'")):
            wrong = await client.call_tool("iso_codes", arguments)
            assert wrong.is_error and words in text_of(wrong), text_of(wrong)
            assert "Fix the arguments and call again." in text_of(wrong)
