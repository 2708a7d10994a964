"""mcp-hotmesh's pytest plugin: the fixtures ``hotmesh_postgres`` and ``hotmesh_serve`` (``mcp_hotmesh.testing``).

pytest loads this module in every run where mcp-hotmesh is installed (entry point ``pytest11``), so it imports
nothing but pytest: the package is imported, and a server started, only when a test asks for a fixture. It lives
outside the package because importing ``mcp_hotmesh.testing`` imports ``mcp_hotmesh`` first, about 0.25 s.
``pytest -p no:mcp_hotmesh`` leaves it out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mcp_hotmesh import RetryPolicy, ToolSet
    from mcp_hotmesh.testing import Mode, Postgres, ServedTools, ServeTools


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that serves tools runs on asyncio only: anyio's plugin also parametrizes tests for trio when trio is
    installed, and those are skipped, saying why."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("anyio_backend") if callspec is not None else None
        if backend is None or "hotmesh_serve" not in getattr(item, "fixturenames", ()):
            continue
        name = backend if isinstance(backend, str) else backend[0]
        if name != "asyncio":
            item.add_marker(pytest.mark.skip(reason=f"mcp-hotmesh serves tools on asyncio (asyncpg), not {name}"))


@pytest.fixture(scope="session")
def hotmesh_postgres() -> Iterator[Postgres]:
    """The tests' PostgreSQL: the embedded one in a temporary directory, started once per session, or the server
    that ``HOTMESH_TEST_DSN`` names (a superuser's DSN)."""
    from mcp_hotmesh.errors import HotMeshError
    from mcp_hotmesh.testing import start_postgres

    try:
        postgres = start_postgres()
    except HotMeshError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:  # (outside the except: the report is one line, with no exception chained to it)
        pytest.fail(f"mcp-hotmesh could not start PostgreSQL for the tests: {problem}", pytrace=False)
    try:
        yield postgres
    finally:
        postgres.stop()


@pytest.fixture
async def hotmesh_serve(hotmesh_postgres: Postgres, anyio_backend: Any) -> AsyncIterator[ServeTools]:
    """``served = await hotmesh_serve(toolset, mode="auto", retry=None, call_timeout=30.0)``: the tool set (a
    ``ToolSet`` or ``"module:attr"``) served through the real queue to a connected ``mcp`` client
    (``served.client``; ``served.call_tool`` records progress), in a fresh schema. Torn down when the test ends.

    Requesting ``anyio_backend`` makes anyio's pytest plugin run the test, with no marker."""
    backend = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if backend != "asyncio":  # an anyio_backend fixture of the user's own
        pytest.fail(f"mcp-hotmesh serves tools on asyncio (asyncpg), not {backend}: make anyio_backend 'asyncio'",
                    pytrace=False)
    from mcp_hotmesh.errors import HotMeshError
    from mcp_hotmesh.testing import Servers

    servers = Servers(hotmesh_postgres)

    async def serve(tools: ToolSet | str, *, mode: Mode = "auto", retry: RetryPolicy | None = None,
                    call_timeout: float = 30.0) -> ServedTools:
        __tracebackhide__ = True
        try:
            return await servers.serve(tools, mode=mode, retry=retry, call_timeout=call_timeout)
        except HotMeshError as exc:  # a mistake in the tool set or the setup: one line, not our wiring's frames
            problem = str(exc)
        pytest.fail(f"mcp-hotmesh could not serve {tools!r}: {problem}", pytrace=False)

    serve.__qualname__ = "hotmesh_serve"  # what a failed test's report shows for the argument
    try:
        yield serve
    finally:
        await servers.close()
