"""The tools the official MCP conformance suite calls by name, served through the queue by a secured worker.

``scripts/conformance.py`` serves them (``mcp-hotmesh serve --transport http --tools
examples/conformance/tools.py:toolset``) and runs the suite's server scenarios against the gateway. Each tool
does what its scenario asks (read in the suite's ``dist/index.js``); together they show a handler's rich results
(text, image, audio, embedded resources), ``ToolError``, progress, elicitation and sampling.

All of them serve one topic, ``conformance``, each under its own workflow name, so one worker role for one stream
serves the whole set.
"""

from __future__ import annotations

import base64
import io
import wave
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field

from mcp_hotmesh import Audio, Image, Resource, Text, ToolContext, ToolError, ToolSet

toolset = ToolSet()
_F = TypeVar("_F", bound=Callable[..., Any])
TOPIC = "conformance"

RED_PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def _silence_wav() -> bytes:
    """Eight samples of silence: the smallest sound there is, as a WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 8)
    return out.getvalue()


def _tool(name: str) -> Callable[[_F], _F]:
    """Register a tool under the name the suite calls, on the one topic, with its name as the workflow name."""
    return toolset.tool(name=name, topic=TOPIC, workflow_name=name)


@_tool("test_simple_text")
async def simple_text() -> Text:
    """Return a fixed sentence as text."""
    return Text("This is a simple text response for testing.")


@_tool("test_image_content")
async def image_content() -> Image:
    """Return a 1x1 red pixel as a PNG image."""
    return Image(RED_PIXEL_PNG, mime_type="image/png")


@_tool("test_audio_content")
async def audio_content() -> Audio:
    """Return a moment of silence as a WAV sound."""
    return Audio(_silence_wav(), mime_type="audio/wav")


@_tool("test_embedded_resource")
async def embedded_resource() -> Resource:
    """Return a text resource embedded in the result."""
    return Resource("test://embedded-resource", text="This is an embedded resource content.", mime_type="text/plain")


@_tool("test_multiple_content_types")
async def multiple_content_types() -> list[Text | Image | Resource]:
    """Return text, an image and an embedded JSON resource together."""
    return [
        Text("Multiple content types test:"),
        Image(RED_PIXEL_PNG, mime_type="image/png"),
        Resource("test://mixed-content-resource", text='{"test":"data","value":123}', mime_type="application/json"),
    ]


@_tool("test_error_handling")
async def error_handling() -> Text:
    """Always fail, as a tool error the agent reads."""
    raise ToolError("This tool intentionally returns an error for testing")


@_tool("test_tool_with_progress")
async def tool_with_progress(ctx: ToolContext) -> Text:
    """Report progress 0, 50 and 100 of 100, a moment apart, then say it is done."""
    for step in (0, 50, 100):
        if step:
            await anyio.sleep(0.1)
        await ctx.report_progress(step, 100)
    return Text("Progress reported: 0, 50 and 100 of 100.")


@_tool("test_sampling")
async def sampling(prompt: Annotated[str, Field(description="the prompt for the client's model")],
                   ctx: ToolContext) -> Text:
    """Ask the client's model to complete the prompt; return its answer."""
    answer = await ctx.sample(prompt, max_tokens=100)
    return Text(f"LLM response: {answer.text}")


@_tool("test_elicitation")
async def elicitation(message: Annotated[str, Field(description="the message to show the user")],
                      ctx: ToolContext) -> Text:
    """Ask the user for a user name and an email address; return what they answered."""
    answer = await ctx.elicit(message, {
        "type": "object",
        "properties": {"username": {"type": "string", "description": "User's response"},
                       "email": {"type": "string", "description": "User's email address"}},
        "required": ["username", "email"],
    })
    return Text(f"User response: action={answer.action}, content={answer.content}")


@_tool("test_elicitation_sep1034_defaults")
async def elicitation_defaults(ctx: ToolContext) -> Text:
    """Ask the user to confirm a profile whose every field has a default."""
    answer = await ctx.elicit("Please confirm your profile", {
        "type": "object",
        "properties": {
            "name": {"type": "string", "default": "John Doe"},
            "age": {"type": "integer", "default": 30},
            "score": {"type": "number", "default": 95.5},
            "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
            "verified": {"type": "boolean", "default": True},
        },
    })
    return Text(f"Elicitation completed: action={answer.action}, content={answer.content}")


@_tool("test_elicitation_sep1330_enums")
async def elicitation_enums(ctx: ToolContext) -> Text:
    """Ask the user to choose, in each of the five ways an elicitation offers choices."""
    titled = [{"const": "value1", "title": "First Option"}, {"const": "value2", "title": "Second Option"},
              {"const": "value3", "title": "Third Option"}]
    answer = await ctx.elicit("Please make your choices", {
        "type": "object",
        "properties": {
            "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
            "titledSingle": {"type": "string", "oneOf": titled},
            "legacyEnum": {"type": "string", "enum": ["opt1", "opt2", "opt3"],
                           "enumNames": ["Option One", "Option Two", "Option Three"]},
            "untitledMulti": {"type": "array", "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
            "titledMulti": {"type": "array", "items": {"anyOf": [
                {"const": "value1", "title": "First Choice"}, {"const": "value2", "title": "Second Choice"},
                {"const": "value3", "title": "Third Choice"}]}},
        },
    })
    return Text(f"Elicitation completed: action={answer.action}, content={answer.content}")


class address(BaseModel):  # the suite looks for $defs.address, and pydantic names defs by class
    street: str
    city: str


class SchemaArguments(BaseModel):
    model_config = ConfigDict(extra="forbid",  # additionalProperties: false
                              json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"})

    name: str
    home: address | None = None


@toolset.tool(name="json_schema_2020_12_tool", topic=TOPIC, workflow_name="json_schema_2020_12_tool")
async def json_schema_tool(arguments: SchemaArguments) -> Text:
    """Accept arguments described by a JSON Schema 2020-12 document ($schema, $defs, additionalProperties)."""
    return Text(f"Received: {arguments.model_dump_json()}")


@_tool("test_reconnection")
async def reconnection() -> Text:
    """Wait half a second, then answer: the SSE polling scenario reconnects to a call while it runs."""
    await anyio.sleep(0.5)
    return Text("Reconnection test completed.")
