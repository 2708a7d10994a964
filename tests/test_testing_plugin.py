"""The pytest plugin for tool authors (``mcp_hotmesh.testing``, ``pytest_mcp_hotmesh``).

A tool author's project is a temporary directory outside this repository with the README's two files in it,
run by ``python -m pytest`` in a subprocess of this virtual environment, with no setting at all: the plugin is
loaded from the installed package, starts its own embedded PostgreSQL and serves the tools. The helpers and the
teardown are checked in-process against the session's server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp.types import CallToolResult, TextContent

from mcp_hotmesh import ToolSet
from mcp_hotmesh.errors import ToolInputError
from mcp_hotmesh.examples import toolset as examples
from mcp_hotmesh.testing import Postgres, Progress, Servers, ServeTools, error_text, invoke, structured
from tests.helpers import ROOT, PgServer

BROKEN_TOOLS = '''
from mcp_hotmesh import ToolSet

toolset = ToolSet()


@toolset.tool(topic="greet")
async def greet(name: str) -> dict[str, str]:
    """Greet someone by name."""
    raise RuntimeError("the greeting service is down")
'''


def readme_files() -> dict[str, str]:
    """The files of the README's "Testing your tools", by the name in each block's first line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Testing your tools\n", 1)[1].split("\n## ", 1)[0]
    return {name: body for name, body in re.findall(r"```python\n# (\w+\.py)\n(.*?)```", section, re.S)}


def user_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` in ``project`` as its author runs it: this environment's Python, no HOTMESH_* or
    PYTEST_* setting, warnings as errors (the plugin must add none)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HOTMESH_", "PYTEST_"))}
    return subprocess.run([sys.executable, "-m", "pytest", "-W", "error", "-p", "no:cacheprovider", *args],
                          cwd=project, env=environ, capture_output=True, text=True, timeout=300)


def failure_of(output: str, test: str) -> str:
    """The report pytest prints for a failed ``test``, up to its captured output."""
    sections = re.split(r"\n_{3,} (\S+) _{3,}\n", output)
    found = {sections[i]: sections[i + 1] for i in range(1, len(sections) - 1, 2)}
    report = next(body for name, body in found.items() if name.split("[")[0] == test)
    return report.split("\n--------")[0].split("\n=====")[0]


@pytest.mark.slow
def test_the_readme_test_passes_in_a_users_project_and_a_failing_tool_says_why(tmp_path: Path) -> None:
    files = readme_files()
    assert sorted(files) == ["greet.py", "test_greet.py", "test_greet_alone.py"]
    assert len(files["test_greet.py"].strip().splitlines()) <= 10
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    (tmp_path / "broken.py").write_text(BROKEN_TOOLS)
    (tmp_path / "test_broken.py").write_text(
        files["test_greet.py"].replace("from greet import", "from broken import")
        .replace("def test_greet(", "def test_greet_broken(")
        + '\n\nasync def test_tools_not_found(hotmesh_serve):\n    await hotmesh_serve("nosuch.py:toolset")\n'
        + '\n\nasync def test_a_tool_not_there(hotmesh_serve):\n'
          '    served = await hotmesh_serve(toolset)\n'
          '    await served.call_tool("greeet", {"name": "Ada"})\n')

    (tmp_path / "test_backends.py").write_text(  # anyio's plugin adds trio when it is installed
        "import pytest\n\nfrom greet import toolset\n\n\n"
        '@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])\n'
        "async def test_each_backend(hotmesh_serve, anyio_backend):\n"
        "    await hotmesh_serve(toolset)\n")

    done = user_pytest(tmp_path, "-rA", "--durations=0")
    print(done.stdout[-3000:])  # the durations: `pytest -s -k users_project` shows how long each phase took
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"\b3 failed, 3 passed, 1 skipped\b", done.stdout), done.stdout
    assert re.search(r"PASSED test_greet\.py::test_greet\b", done.stdout), done.stdout
    assert re.search(r"PASSED test_greet_alone\.py::test_greet_alone\b", done.stdout), done.stdout
    assert "PASSED test_backends.py::test_each_backend[asyncio]" in done.stdout
    assert "SKIPPED [1] test_backends.py:6: mcp-hotmesh serves tools on asyncio (asyncpg), not trio" in done.stdout

    # the handler's exception, as the README shows it: the user's assertion and the handler's message
    broken = failure_of(done.stdout, "test_greet_broken")
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"```\n(>.*?)\n```", readme.split("\n## Testing your tools\n", 1)[1], re.S)
    assert shown is not None
    for line in shown[1].splitlines():
        assert line in broken, (line, broken)
    # ... and a tool set that cannot be loaded: one line, no traceback
    missing = failure_of(done.stdout, "test_tools_not_found")
    assert "mcp-hotmesh could not serve 'nosuch.py:toolset': no such file: nosuch.py" in missing
    # ... and a call to a tool that is not there: the protocol's error, at the test's line
    unknown = failure_of(done.stdout, "test_a_tool_not_there")
    assert 'await served.call_tool("greeet"' in unknown and "Unknown tool: 'greeet'" in unknown, unknown
    for report in (broken, missing, unknown):
        for noise in ("Traceback", "During handling", "mcp_hotmesh/", "site-packages"):
            assert noise not in report, report
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_plugin_imports_nothing_until_a_test_asks(tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text(
        "import sys\n\n\n"
        "def test_plain():\n"
        '    assert "pytest_mcp_hotmesh" in sys.modules\n'
        '    assert sorted(m for m in sys.modules if m.split(".")[0] in ("mcp_hotmesh", "mcp", "asyncpg")) == []\n')
    done = user_pytest(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b1 passed\b", done.stdout), done.stdout


# --------------------------------------------------------------------------------------- in this process
def result(text: str, *, error: bool, data: dict[str, object] | None = None) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data, is_error=error)


def test_structured_and_error_text_say_what_happened_instead() -> None:
    assert structured(result("{}", error=False, data={"a": 1})) == {"a": 1}
    assert error_text(result("no such user", error=True)) == "no such user"
    with pytest.raises(AssertionError, match=r"^the tool call failed: no such user$"):
        structured(result("no such user", error=True))
    with pytest.raises(AssertionError, match=r"^the tool call succeeded, expected a failure; it returned \{'a': 1\}$"):
        error_text(result("{}", error=False, data={"a": 1}))
    with pytest.raises(AssertionError, match="returned no structured result, only: 'plain text'"):
        structured(result("plain text", error=False))


@pytest.mark.anyio
async def test_invoke_runs_a_handler_as_the_worker_does_without_a_database() -> None:
    done = await invoke(examples, "sleep", {"seconds": 0, "steps": 2})
    assert done.result == {"seconds": 0, "steps": 2}
    assert done.progress == [Progress(1, 2, "step 1 of 2"), Progress(2, 2, "step 2 of 2")]
    assert (await invoke(examples, "flaky", attempt=1)).result["attempt"] == 1
    with pytest.raises(Exception, match="the first attempt always fails"):  # the handler's own exception
        await invoke(examples, "flaky")
    with pytest.raises(ToolInputError, match="seconds"):
        await invoke(examples, "sleep", {"seconds": -1})
    with pytest.raises(AssertionError, match=r"no tool named 'nope' in the tool set; it has \['echo', "):
        await invoke(examples, "nope")


@pytest.mark.anyio
async def test_a_module_attr_spec_in_the_handshake_era(hotmesh_serve: ServeTools) -> None:
    served = await hotmesh_serve("mcp_hotmesh.examples:toolset", mode="legacy")
    assert served.client.protocol_version == "2025-11-25"
    assert structured(await served.call_tool("echo", {"text": "hi"})) == {"text": "hi", "length": 2}


async def _leftovers(pg_server: PgServer, schema: str) -> tuple[bool, list[str]]:
    import asyncpg

    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        exists = bool(await admin.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema))
        roles = [r[0] for r in await admin.fetch("SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)",
                                                 schema + "_")]
    finally:
        await admin.close()
    return exists, roles


@pytest.mark.anyio
async def test_teardown_drops_the_schema_and_roles_and_does_not_wait_for_a_hung_handler(
        hotmesh_postgres: Postgres, pg_server: PgServer) -> None:
    hung = ToolSet()

    @hung.tool(topic="hang")
    async def hang() -> dict[str, str]:
        """Never answers."""
        await anyio.sleep_forever()
        return {}

    servers = Servers(hotmesh_postgres)
    served = await servers.serve(hung, call_timeout=0.5)
    assert "hang" in error_text(await served.call_tool("hang"))  # the call timed out; its handler still runs
    assert (await _leftovers(pg_server, served.schema))[0]
    with anyio.fail_after(30):  # the worker gives a running handler a second, then cancels it
        await servers.close()
    assert await _leftovers(pg_server, served.schema) == (False, [])
