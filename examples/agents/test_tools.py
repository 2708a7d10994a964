"""Tests of the tools in ``tools.py``, as their author writes them: ``pytest examples/agents``.

``hotmesh_serve`` (mcp-hotmesh's pytest plugin, loaded by pytest on its own) serves the tool set as
``mcp-hotmesh serve`` would, through PostgreSQL to a secured worker, and connects an ``mcp`` client: each call
below goes the whole way an agent's does. ``invoke`` runs one handler in this process, with no database.
"""

from __future__ import annotations

import pytest
from tools import toolset

from mcp_hotmesh import ToolSet
from mcp_hotmesh.testing import DeadLetter, Mode, ServeTools, error_text, invoke, structured


async def test_word_count(hotmesh_serve: ServeTools) -> None:
    served = await hotmesh_serve(toolset)
    result = await served.call_tool("word_count", {"text": "the cat and the hat", "top": 2})
    assert structured(result) == {"words": 5, "lines": 1, "top": ["the", "and"]}


@pytest.mark.parametrize("mode", ["auto", "legacy"])  # the newest protocol, and the handshake era of most hosts
async def test_every_tool_is_listed_in_both_protocol_eras(hotmesh_serve: ServeTools, mode: Mode) -> None:
    served = await hotmesh_serve(toolset, mode=mode)
    listed = {t.name: t for t in (await served.client.list_tools()).tools}
    assert sorted(listed) == sorted(t.name for t in toolset.tools)
    assert listed["word_count"].input_schema["properties"]["top"]["maximum"] == 50
    assert structured(await served.call_tool("math_add", {"a": 2, "b": 3})) == {"result": 5}


async def test_arguments_out_of_bounds_are_refused(hotmesh_serve: ServeTools) -> None:
    served = await hotmesh_serve(toolset)
    assert "top" in error_text(await served.call_tool("word_count", {"text": "a b", "top": 99}))
    assert await served.dead_letters() == []  # refused before anything was queued


async def test_progress_reaches_the_agent(hotmesh_serve: ServeTools) -> None:
    served = await hotmesh_serve(toolset)
    result = await served.call_tool("sleep", {"seconds": 0.3, "steps": 3})
    assert structured(result) == {"seconds": 0.3, "steps": 3}
    assert served.progress, "no progress reached the client"
    assert all(p.total == 3 and (p.message or "").startswith("step ") for p in served.progress)


async def test_a_transient_failure_is_retried(hotmesh_serve: ServeTools) -> None:
    served = await hotmesh_serve(toolset)
    assert structured(await served.call_tool("flaky", {}))["attempt"] == 1
    assert await served.dead_letters() == []


broken = ToolSet()


@broken.tool(topic="inventory", name="reserve")
async def reserve(sku: str) -> dict[str, str]:
    """Reserve one item of a product (always fails here: the warehouse is unreachable)."""
    raise ConnectionError(f"the warehouse did not answer for {sku}")


async def test_a_tool_that_keeps_failing_is_dead_lettered(hotmesh_serve: ServeTools) -> None:
    served = await hotmesh_serve(broken)
    result = await served.call_tool("reserve", {"sku": "A-1"})
    assert "the warehouse did not answer for A-1" in error_text(result)
    assert await served.dead_letters() == [
        DeadLetter("reserve", {"sku": "A-1"}, "the warehouse did not answer for A-1", attempts=3)]


@pytest.mark.anyio
async def test_word_count_alone() -> None:
    done = await invoke(toolset, "word_count", {"text": "to be or not to be\nthat is", "top": 1})
    assert done.result == {"words": 8, "lines": 2, "top": ["be"]}
    long = await invoke(toolset, "word_count", {"text": "word " * 20_000})
    assert [(p.progress, p.total) for p in long.progress] == [(10_000, 20_000), (20_000, 20_000)]
