"""Over stdio, stdout is the protocol and nothing else, in the environment a user's MCP host gives ``serve``.

A desktop host does not set ``PYTHONUNBUFFERED``, so the child's ``sys.stdout`` is block-buffered (stdout is a
pipe): a tool module's ``print`` then sits in Python's buffer and is written whenever that buffer is flushed,
the last chance being interpreter shutdown. Every stdout byte must be JSON-RPC until the process has exited,
and what tools print (at import, while handling a call, from a child process, at exit) must go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.helpers import ROOT, Env, clean_environ, cli_command

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # a serve subprocess

# A tool module that prints in every way a tool author might, none of it flushed by hand.
NOISY_TOOLS = '''
import atexit
import sys

import anyio
from pydantic import BaseModel

from mcp_hotmesh._tools import ToolSet

print("printed at import")
atexit.register(print, "printed at exit")
toolset = ToolSet()


class Said(BaseModel):
    text: str


@toolset.tool(topic="noisy")
async def noisy(text: str) -> Said:
    """Print the text, have a child process print it too, and return it."""
    print("printed while handling", text)
    # stdout=None: the child inherits this process's fd 1, as a subprocess started by a tool usually does
    await anyio.run_process([sys.executable, "-c", "print('printed by a child')"], stdout=None, stderr=None)
    return Said(text=text)
'''

PRINTED = ["printed at import", "printed while handling hello", "printed by a child", "printed at exit"]


def user_environment(env: Env) -> dict[str, str]:
    """This machine's environment as a user's host would pass it: no ``PYTHONUNBUFFERED``, no stray HOTMESH_*."""
    child = clean_environ(HOTMESH_DSN=env.server.admin_dsn, HOTMESH_SCHEMA=env.schema)
    child.pop("PYTHONUNBUFFERED", None)
    return child


def answers_call(line: bytes) -> bool:
    """Whether a stdout line is the answer to the tools/call (id 3); anything else, stray text included, is not."""
    try:
        message = json.loads(line)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("id") == 3


async def test_nothing_but_protocol_reaches_stdout_without_pythonunbuffered(env: Env, tmp_path: Path) -> None:
    tools = tmp_path / "noisy_tools.py"
    tools.write_text(NOISY_TOOLS)
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "a-host", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
         "params": {"name": "noisy", "arguments": {"text": "hello"}}},
    ]
    stdout = b""
    stderr = b""
    async with await anyio.open_process([*cli_command(), "serve", "--tools", f"{tools}:toolset"],
                                        env=user_environment(env), cwd=str(ROOT)) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc_stdout, proc_stderr = proc.stdout, proc.stderr
        answered = anyio.Event()

        async def read_stdout() -> None:
            nonlocal stdout
            async for chunk in proc_stdout:  # until EOF: the wire is closed and the process gone
                stdout += chunk
                if any(answers_call(line) for line in stdout.splitlines()):
                    answered.set()
            answered.set()  # EOF before the answer: the assertions below say why

        async def read_stderr() -> None:  # drained all along, so a chatty stderr cannot block the server
            nonlocal stderr
            async for chunk in proc_stderr:
                stderr += chunk

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stdout)
                tg.start_soon(read_stderr)
                await proc.stdin.send("".join(json.dumps(r) + "\n" for r in requests).encode())
                await answered.wait()
                await proc.stdin.aclose()  # the host goes away: serve stops and the process exits
                code = await proc.wait()
    errors = stderr.decode(errors="replace")
    assert code == 0, errors
    assert stdout.endswith(b"\n") or not stdout, stdout
    messages: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        try:
            messages.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a line on the protocol's stdout is not JSON-RPC: {line!r}")
    assert all(m.get("jsonrpc") == "2.0" for m in messages), messages
    by_id = {m["id"]: m for m in messages if "id" in m}
    assert [t["name"] for t in by_id[2]["result"]["tools"]] == ["noisy"]
    assert by_id[3]["result"]["structuredContent"] == {"text": "hello"}
    for text in PRINTED:
        assert text in errors, f"{text!r} is not on stderr:\n{errors}"
