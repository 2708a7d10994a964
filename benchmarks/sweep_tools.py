"""The sweep's worker tools: ``SWEEP_TOPICS`` no-op tools on streams ``<SWEEP_PREFIX>_0000``, ``..._0001``, ..."""

from __future__ import annotations

import os

from mcp_hotmesh._tools import ToolSet

toolset = ToolSet()
PREFIX = os.environ.get("SWEEP_PREFIX", "sweep.t")


def _make(i: int) -> None:
    async def noop() -> dict[str, int]:
        """Does nothing; for the sweep benchmark."""
        return {}

    toolset.tool(topic=f"{PREFIX}_{i:04d}", name=f"{PREFIX.replace('.', '_')}_{i:04d}")(noop)


for _i in range(int(os.environ.get("SWEEP_TOPICS", "1"))):
    _make(_i)
