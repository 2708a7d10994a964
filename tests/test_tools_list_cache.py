"""tools/list is built once per catalog and kept until the catalog changes: a changed, added or removed tool is
in the next listing, through the real ``mcp`` client."""

from __future__ import annotations

import pytest
from mcp import Client

from tests.helpers import Env, hub_for, wait_for

pytestmark = pytest.mark.anyio

LATER = "test.later"


async def test_the_cached_list_follows_every_change_of_a_tool(env: Env) -> None:
    async with hub_for(env, extra_streams=[LATER]) as hub:
        _, later = await env.worker([LATER])
        async with Client(hub.gateway.server) as client:

            async def described() -> dict[str, str | None]:
                return {t.name: t.description for t in (await client.list_tools()).tools}

            first = await described()
            assert "later" not in first
            assert await described() == first  # the same catalog: the same list
            for description in ("new", "changed"):
                await later.register_tool(LATER, "", {"name": "later", "description": description,
                                                      "input_schema": {"type": "object"}})

                async def shows(description: str = description) -> bool:
                    return (await described()).get("later") == description

                await wait_for(shows, 10)
            await later.unregister_tool(LATER, "")

            async def gone() -> bool:
                return "later" not in await described()

            await wait_for(gone, 10)
            assert await described() == first
