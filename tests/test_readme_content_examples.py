"""The README's examples of rich results and of a handler's questions, run as written, through the queue, with a
real MCP client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp.types import ElicitRequestParams, ElicitResult, EmbeddedResource, ImageContent, TextContent

from examples.conformance.tools import RED_PIXEL_PNG
from mcp_hotmesh import ToolSet
from tests.helpers import Env, hub_for, text_of

pytestmark = pytest.mark.anyio

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(heading: str) -> str:
    """The first Python block after ``heading`` in the README."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def readme_tools() -> ToolSet:
    toolset = ToolSet()
    namespace: dict[str, Any] = {"toolset": toolset, "png_bytes": RED_PIXEL_PNG, "csv_text": "day,temp\nmon,21\n"}
    for heading in ("### Rich results", "### Asking the user mid-call"):
        exec(compile(snippet(heading), f"README.md ({heading})", "exec"), namespace)
    return toolset


async def test_the_readme_examples_work_as_written(env: Env) -> None:
    tools = readme_tools()
    report, cancel = tools.tools  # weekly_report, cancel_order
    answers = [ElicitResult(action="accept", content={"reason": "late"}), ElicitResult(action="decline")]

    async def user(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        return answers.pop(0)

    async with hub_for(env, toolset=tools) as hub, Client(hub.gateway.server, mode="legacy",
                                                           elicitation_callback=user) as client:
        with anyio.fail_after(30):
            weekly = await client.call_tool(report.name, {"city": "Oslo"})
            confirmed = await client.call_tool(cancel.name, {"order_id": "o-1"})
            declined = await client.call_tool(cancel.name, {"order_id": "o-2"})
    assert [type(c) for c in weekly.content] == [TextContent, ImageContent, EmbeddedResource]
    assert text_of(weekly) == "Warm week in Oslo."
    assert confirmed.structured_content == {"cancelled": "o-1", "reason": "late"}
    assert declined.is_error and text_of(declined) == "The user did not confirm the cancellation."
