"""The benchmark's tools: no-ops, so what is measured is the queue and the MCP path, not a handler.

``toolset`` (stream ``bench.noop``) is what the end-to-end worker serves; ``drain_toolset`` (``bench.drain``) is
what the drain worker serves, so the two never take each other's calls.
"""

from __future__ import annotations

from typing import Any

from mcp_hotmesh._tools import ToolSet

STREAM = "bench.noop"
DRAIN_STREAM = "bench.drain"
SCALE_STREAM = "bench.scale"

toolset = ToolSet()
drain_toolset = ToolSet()


@toolset.tool(topic=STREAM, name="noop")
async def noop() -> dict[str, Any]:
    """Does nothing and returns an empty object; for benchmarks."""
    return {}


@drain_toolset.tool(topic=DRAIN_STREAM, name="noop_drain")
async def noop_drain() -> dict[str, Any]:
    """Does nothing and returns an empty object; for the drain benchmark."""
    return {}
