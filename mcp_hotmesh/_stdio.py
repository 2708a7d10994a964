"""The stdio transport: one MCP client on stdin/stdout, what desktop hosts launch. Only protocol reaches stdout."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

import anyio
from mcp.server.stdio import stdio_server

from ._mcp_server import McpGateway

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- stdio
@contextlib.contextmanager
def protocol_stdout() -> Iterator[anyio.AsyncFile[str]]:
    """Keep stdout for the protocol alone, from the very start to the process's exit: the real stdout moves to a
    private descriptor only the protocol writes, fd 1 points at stderr (a child process, a C library) and so
    does ``sys.stdout`` (a ``print``), so nothing else can write a stray line into the protocol.

    Neither is pointed back at the real stdout on exit. Without PYTHONUNBUFFERED (a user's host does not set
    it) ``sys.stdout`` is block-buffered on a pipe: what sits in that buffer, and what atexit handlers print,
    is written when the interpreter flushes it at shutdown, and must land on stderr, not after the protocol's
    last message. Closing the wire, its only descriptor, is what tells the host the protocol has ended."""
    wire = os.dup(1)
    os.dup2(2, 1)
    sys.stdout.flush()  # after the move: what was printed before serving goes to stderr, not ahead of the protocol
    # not a block buffer on fd 1: a print goes to stderr at once, in order with the logs
    buffered, sys.stdout = sys.stdout, sys.stderr
    stream = io.TextIOWrapper(os.fdopen(wire, "wb"), encoding="utf-8", newline="\n")
    try:
        yield anyio.wrap_file(stream)
    finally:
        with contextlib.suppress(OSError, ValueError):
            buffered.flush()  # writes through a reference kept to the old sys.stdout: to stderr, now
        with contextlib.suppress(OSError, ValueError):
            stream.close()  # the host may be gone already (a broken pipe)


async def run_stdio(gateway: McpGateway, stdout: anyio.AsyncFile[str] | None = None) -> None:
    """Serve one client on stdin/stdout until stdin closes. Only protocol goes to stdout."""
    async with stdio_server(stdout=stdout) as (read_stream, write_stream):
        await gateway.server.run(read_stream, write_stream, gateway.server.create_initialization_options())
