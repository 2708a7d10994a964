"""Rich results through the queue: every content type reaches a real MCP client as it was returned, and a result
the worker role writes by hand is checked as hostile input (a malformed one is a clear tool error, never a crash).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import AudioContent, EmbeddedResource, ImageContent, ResourceLink, TextContent, TextResourceContents
from pydantic import BaseModel

from examples.conformance import tools as conformance
from mcp_hotmesh import Image, Resource, Text, ToolResult, ToolSet
from mcp_hotmesh import ResourceLink as Link
from mcp_hotmesh._common import CONTENT_KEY
from mcp_hotmesh._content import STRUCTURED_KEY
from tests.helpers import Env, Hub, hub_for, text_of, wait_for

pytestmark = pytest.mark.anyio

PIXEL = conformance.RED_PIXEL_PNG
TOOLS = ToolSet(list(conformance.toolset.tools))


class Totals(BaseModel):
    rows: int


@TOOLS.tool(name="rich_blob", topic="rich", workflow_name="blob")
async def blob() -> Resource:
    """An embedded binary resource."""
    return Resource("file:///data.bin", data=b"\x00\x01\x02", mime_type="application/octet-stream")


@TOOLS.tool(name="rich_link", topic="rich", workflow_name="link")
async def link() -> Link:
    """A link to a resource."""
    return Link("https://example.com/report.csv", name="report.csv", title="The report", mime_type="text/csv",
                size=1234)


@TOOLS.tool(name="rich_with_structure", topic="rich", workflow_name="structured")
async def with_structure() -> ToolResult:
    """Text and an image, and structured content beside them."""
    return ToolResult(content=[Text("3 rows", annotations={"audience": ["user"], "priority": 0.5}),
                               Image(PIXEL, mime_type="image/png")], structured={"rows": 3})


@TOOLS.tool(name="rich_plain", topic="rich", workflow_name="plain")
async def plain() -> Totals:
    """A plain result, as before: JSON text and structured content."""
    return Totals(rows=7)


@TOOLS.tool(name="rich_reserved_key", topic="rich", workflow_name="reserved")
async def reserved_key() -> dict[str, Any]:
    """A plain result that holds the key rich results use: it must arrive as the plain result it is."""
    return {CONTENT_KEY: "not content", "n": 1}


@pytest.fixture
async def hub(env: Env) -> AsyncIterator[Hub]:
    async with hub_for(env, toolset=TOOLS, extra_streams=["hostile.rich"]) as h:
        yield h


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_every_content_type_round_trips(hub: Hub, mode: str) -> None:
    async with Client(hub.gateway.server, mode=mode) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert listed["test_image_content"].output_schema is None  # content, not structure
        assert listed["rich_plain"].output_schema is not None

        text = await client.call_tool("test_simple_text", {})
        assert not text.is_error and text.structured_content is None
        assert text.content == [TextContent(text="This is a simple text response for testing.")]

        image = (await client.call_tool("test_image_content", {})).content
        assert len(image) == 1 and isinstance(image[0], ImageContent) and image[0].mime_type == "image/png"
        assert base64.b64decode(image[0].data) == PIXEL

        audio = (await client.call_tool("test_audio_content", {})).content
        assert isinstance(audio[0], AudioContent) and audio[0].mime_type == "audio/wav"
        assert base64.b64decode(audio[0].data) == conformance._silence_wav()

        embedded = (await client.call_tool("test_embedded_resource", {})).content
        assert isinstance(embedded[0], EmbeddedResource)
        assert embedded[0].resource == TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content.")

        blob = (await client.call_tool("rich_blob", {})).content[0]
        assert isinstance(blob, EmbeddedResource) and base64.b64decode(blob.resource.blob) == b"\x00\x01\x02"  # type: ignore[union-attr]

        link = (await client.call_tool("rich_link", {})).content[0]
        assert isinstance(link, ResourceLink)
        assert (link.uri, link.name, link.title, link.mime_type, link.size) == (
            "https://example.com/report.csv", "report.csv", "The report", "text/csv", 1234)

        mixed = (await client.call_tool("test_multiple_content_types", {})).content
        assert [c.type for c in mixed] == ["text", "image", "resource"]

        both = await client.call_tool("rich_with_structure", {})
        assert not both.is_error and both.structured_content == {"rows": 3}
        assert isinstance(both.content[0], TextContent) and both.content[0].annotations is not None
        assert both.content[0].annotations.audience == ["user"] and both.content[0].annotations.priority == 0.5
        assert isinstance(both.content[1], ImageContent)

        plain = await client.call_tool("rich_plain", {})
        assert plain.structured_content == {"rows": 7} and '"rows": 7' in text_of(plain)

        reserved = await client.call_tool("rich_reserved_key", {})
        assert not reserved.is_error and reserved.structured_content == {CONTENT_KEY: "not content", "n": 1}


def _valid_image() -> dict[str, Any]:
    return {"type": "image", "data": base64.b64encode(PIXEL).decode(), "mimeType": "image/png"}


MALFORMED: list[tuple[Any, str]] = [
    ({CONTENT_KEY: "text"}, "its content is not a list of blocks"),
    ({CONTENT_KEY: []}, "its content is not a list of blocks"),
    ({CONTENT_KEY: [{"type": "text", "text": "x"}] * 101}, "101 content blocks; at most 100"),
    ({CONTENT_KEY: [{"type": "video", "data": "AAAA"}]}, "unknown type 'video'"),
    ({CONTENT_KEY: [7]}, "content block 0 is not an object"),
    ({CONTENT_KEY: [{"type": "text", "text": 5}]}, "text is not a string"),
    ({CONTENT_KEY: [{**_valid_image(), "data": "not base64!"}]}, "data is not valid base64"),
    ({CONTENT_KEY: [{**_valid_image(), "mimeType": "text/html"}]}, "an image needs an image/ media type"),
    ({CONTENT_KEY: [{**_valid_image(), "mimeType": "image/png\r\nX-Evil: 1"}]}, "mimeType is not a media type"),
    ({CONTENT_KEY: [{"type": "audio", "data": "AAAA"}]}, "mimeType is not a media type"),
    ({CONTENT_KEY: [{"type": "resource", "resource": {"uri": "no scheme", "text": "x"}}]}, "uri is not an absolute"),
    ({CONTENT_KEY: [{"type": "resource", "resource": {"uri": "file:///x" + "a" * 3000, "text": "x"}}]},
     "uri is not an absolute"),
    ({CONTENT_KEY: [{"type": "resource", "resource": {"uri": "file:///x", "text": "x", "blob": "AAAA"}}]},
     "either text or blob"),
    ({CONTENT_KEY: [{"type": "resource_link", "uri": "file:///x", "name": ""}]}, "name is not a non-empty string"),
    ({CONTENT_KEY: [{"type": "resource_link", "uri": "file:///x", "name": "n", "size": -1}]}, "not a byte count"),
    ({CONTENT_KEY: [{"type": "text", "text": "x", "annotations": {"priority": 9}}]}, "priority is not a number"),
    ({CONTENT_KEY: [{"type": "text", "text": "x", "annotations": {"audience": ["root"]}}]}, "audience"),
    ({CONTENT_KEY: [{"type": "text", "text": "x"}], STRUCTURED_KEY: [1, 2]}, "structured content is not a JSON"),
]


async def test_results_written_by_a_hostile_worker_are_checked(hub: Hub) -> None:
    """The worker role answers calls by hand with malformed content: each is one clear tool error for the agent,
    the gateway goes on serving, and a valid hand-written result still passes (with icons left out)."""
    env = hub.env
    _, worker = await env.worker(["hostile.rich"])
    await worker.register_tool("hostile.rich", "", {"name": "hostile_rich", "description": "d",
                                                    "input_schema": {"type": "object"}})
    await worker.heartbeat(["hostile.rich"], "w", 60_000)

    async def known() -> bool:
        await hub.engine.refresh()
        return any(r.name == "hostile_rich" and r.live_workers for r in hub.engine.tools())

    await wait_for(known)
    valid = {CONTENT_KEY: [{"type": "resource_link", "uri": "https://example.com/x", "name": "x",
                            "icons": [{"src": "http://169.254.169.254/latest/meta-data"}], "_meta": {"a": 1}}]}
    answers = [payload for payload, _ in MALFORMED] + [valid]

    async def answer_by_hand() -> None:
        for payload in answers:
            claimed: list[Any] = []
            while not claimed:
                claimed = await worker.dequeue("hostile.rich", "w", 1, 30_000)
                if not claimed:
                    await anyio.sleep(0.02)
            assert await worker.respond("hostile.rich", claimed[0].id, claimed[0].lease, payload)

    async with Client(hub.gateway.server) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_by_hand)
        for _, words in MALFORMED:
            with anyio.fail_after(15):
                result = await client.call_tool("hostile_rich", {})
            assert result.is_error and words in text_of(result), (words, text_of(result))
            assert "malformed answer" in text_of(result)
        with anyio.fail_after(15):
            ok = await client.call_tool("hostile_rich", {})
        assert not ok.is_error and isinstance(ok.content[0], ResourceLink)
        assert ok.content[0].icons is None and ok.content[0].meta is None
        text = await client.call_tool("test_simple_text", {})
        assert not text.is_error


async def test_a_result_past_the_size_limit_is_refused_by_the_database(hub: Hub) -> None:
    """Sizes are bounded like any result: an image larger than max_payload_bytes never reaches the agent."""
    await hub.env.set("max_payload_bytes", 10_000)
    huge = ToolSet()

    @huge.tool(name="rich_huge", topic="rich.huge")
    async def rich_huge() -> Image:
        """A large image."""
        return Image(b"\x89PNG" + b"\x00" * 20_000, mime_type="image/png")

    async with hub_for(hub.env, toolset=huge) as big, Client(big.gateway.server) as client:
        with anyio.fail_after(15):
            result = await client.call_tool("rich_huge", {})
    assert result.is_error and "result larger than 10000 bytes" in text_of(result)


def test_a_worker_without_content_never_loads_the_sdks_types() -> None:
    """Loading the SDK's types takes over a second: a worker process (the CLI's, the example tools) does not, and
    the helpers load them on first use."""
    import subprocess
    import sys

    code = ("import sys, mcp_hotmesh, mcp_hotmesh._cli, mcp_hotmesh._worker, mcp_hotmesh.examples; "
            "print('mcp_types' in sys.modules); from mcp_hotmesh import Image; print('mcp_types' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split() == ["False", "True"]
