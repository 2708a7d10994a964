"""The stdio transport: one MCP client on stdin/stdout, what desktop hosts launch. Only protocol reaches stdout."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import cast

import anyio
import anyio.from_thread
import anyio.lowlevel
from mcp.server.stdio import stdio_server

from ._mcp_server import McpGateway

log = logging.getLogger(__name__)


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


class _StdinLines:
    """The protocol's lines from stdin, read by a daemon thread.

    A read from a terminal blocks until a line comes; in an anyio worker thread it also kept a stopping process
    waiting for that line (Ctrl-C and SIGTERM logged "stopping" and hung), because cancelling waits for the
    thread and the interpreter waits for non-daemon threads at exit. Here cancelling stops the iteration at once
    and the thread, blocked or not, dies with the process. fd 0 itself points at the null device meanwhile, so a
    handler or a child process reads end-of-file, never the protocol."""

    def __init__(self) -> None:
        self._file = os.fdopen(os.dup(0), "rb", buffering=0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        self._send, self._receive = anyio.create_memory_object_stream[str](16)
        self._token = anyio.lowlevel.current_token()
        threading.Thread(target=self._read, name="mcp-hotmesh stdin", daemon=True).start()

    def _read(self) -> None:
        reader = io.BufferedReader(self._file)
        try:
            for raw in reader:
                anyio.from_thread.run(self._send.send, raw.decode("utf-8", errors="replace"), token=self._token)
        except (RuntimeError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the event loop or the reader is gone: the process is stopping
        with contextlib.suppress(RuntimeError):
            anyio.from_thread.run_sync(self._send.close, token=self._token)  # end of input

    def __aiter__(self) -> _StdinLines:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


async def run_stdio(gateway: McpGateway, stdout: anyio.AsyncFile[str] | None = None) -> None:
    """Serve one client on stdin/stdout until stdin closes. Only protocol goes to stdout."""
    stdin = cast(anyio.AsyncFile[str], _StdinLines())  # the SDK only iterates its lines
    async with stdio_server(stdin=stdin, stdout=stdout) as (read_stream, write_stream):
        await gateway.server.run(read_stream, write_stream, gateway.server.create_initialization_options())
