"""A scripted agent: launches ``mcp-hotmesh serve`` over stdio, lists the tools, calls each one, shows progress.

    python examples/agents/agent.py                     # the embedded PostgreSQL, the default example tools
    python examples/agents/agent.py --tools examples/agents/tools.py:toolset
    HOTMESH_DSN=postgresql://admin@db/app python examples/agents/agent.py

It talks to the server exactly as a desktop host does: the ``mcp`` client spawns the command with the given
environment and speaks JSON-RPC on its stdin and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import anyio
from mcp import Client, MCPError, StdioServerParameters

# Arguments for the tools this script knows; any other tool is called with {} (and may say what is missing).
SAMPLES: dict[str, dict[str, Any]] = {
    "echo": {"text": "hello from the scripted agent"},
    "sleep": {"seconds": 2, "steps": 4},
    "flaky": {},
    "math_add": {"a": 2, "b": 40},
    "math_multiply": {"a": 6, "b": 7},
    "word_count": {"text": "the cat and the hat and the bat", "top": 2},
}


def server_command(tools: str | None) -> StdioServerParameters:
    exe = shutil.which("mcp-hotmesh")
    command, args = (exe, ["serve"]) if exe else (sys.executable, ["-m", "mcp_hotmesh", "serve"])
    if tools:
        args += ["--tools", tools]
    # A host passes only the environment it is told to (plus HOME, PATH, USER...): pass ours through.
    env = {k: v for k, v in os.environ.items() if k.startswith("HOTMESH_")}
    return StdioServerParameters(command=command, args=args, env=env)


async def show_progress(progress: float, total: float | None, message: str | None) -> None:
    print(f"    progress {progress:g}/{total:g}: {message}" if total else f"    progress {progress:g}: {message}")


async def main(tools: str | None) -> None:
    async with Client(server_command(tools), read_timeout_seconds=120) as client:
        print(f"connected: {client.server_info.name if client.server_info else '?'}, "
              f"protocol {client.protocol_version}")
        listed = (await client.list_tools()).tools
        print(f"{len(listed)} tools:")
        for tool in listed:
            print(f"  {tool.name}: {(tool.description or '').splitlines()[0]}")
        for tool in listed:
            arguments = SAMPLES.get(tool.name, {})
            print(f"\ncall {tool.name}({json.dumps(arguments)})")
            try:
                result = await client.call_tool(tool.name, arguments, progress_callback=show_progress)
            except MCPError as exc:
                print(f"  protocol error {exc.code}: {exc.message}")
                continue
            if result.is_error:
                print(f"  error: {' '.join(getattr(c, 'text', '') for c in result.content)}")
            else:
                print(f"  result: {json.dumps(result.structured_content)}")
        print("\ncall echo with a wrong argument type, to see what the model is told:")
        bad = await client.call_tool("echo", {"text": 42})
        print(f"  error: {' '.join(getattr(c, 'text', '') for c in bad.content)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", help="passed to mcp-hotmesh serve --tools (default: the example tools)")
    anyio.run(main, parser.parse_args().tools)
