"""The example tool set: what ``mcp-hotmesh serve`` serves when no ``--tools`` is given.

Each tool is a typed Python function. Its parameters become the input JSON Schema, its return type the output
schema, and its docstring the description the model reads, so the docstrings are written for the model: what
the tool does, what it returns, when it fails.

* ``echo``: returns its input (the smallest round trip through the queue);
* ``sleep``: waits, reporting progress after each step (progress and cancellation);
* ``flaky``: fails on its first attempt and succeeds on the retry (the worker's retry policy);
* ``math_add`` and ``math_multiply``: two tools on one topic, ``math``, told apart by workflow name; one
  consumer serves the topic and dispatches on the workflow name.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from pydantic import BaseModel, Field

from ._tools import ToolContext, ToolSet

toolset = ToolSet()


class Echoed(BaseModel):
    text: str = Field(description="the text that was sent")
    length: int = Field(description="its length in characters")


@toolset.tool(topic="echo")
async def echo(text: Annotated[str, Field(description="any text")]) -> Echoed:
    """Return the given text unchanged, with its length. Use it to check that the tool service is working."""
    return Echoed(text=text, length=len(text))


class Slept(BaseModel):
    seconds: float = Field(description="how long the tool waited")
    steps: int = Field(description="how many progress reports it sent")


@toolset.tool(topic="sleep")
async def sleep(
    seconds: Annotated[float, Field(ge=0, le=300, description="how long to wait, 0 to 300 seconds")] = 1.0,
    steps: Annotated[int, Field(ge=1, le=100, description="how many progress reports to send")] = 4,
    ctx: ToolContext | None = None,
) -> Slept:
    """Wait for the given number of seconds, reporting progress after each step, then say how long it waited.

    Use it to see progress reports and cancellation at work; it has no other effect.
    """
    for step in range(1, steps + 1):
        await anyio.sleep(seconds / steps)  # cancellation lands here
        if ctx is not None:
            await ctx.report_progress(step, steps, f"step {step} of {steps}")
    return Slept(seconds=seconds, steps=steps)


class TransientError(RuntimeError):
    """A failure worth retrying: the next attempt may succeed."""


class Attempted(BaseModel):
    attempt: int = Field(description="the attempt that succeeded, counting from 0")
    note: str


@toolset.tool(topic="flaky")
async def flaky(ctx: ToolContext | None = None) -> Attempted:
    """Fail on the first attempt and succeed on the worker's automatic retry; returns the attempt that worked.

    It shows that a transient failure is retried without the caller doing anything.
    """
    attempt = ctx.attempt if ctx is not None else 0
    if attempt == 0:
        raise TransientError("the first attempt always fails (on purpose); the worker retries it")
    return Attempted(attempt=attempt, note=f"succeeded on attempt {attempt} after a transient failure")


class Sum(BaseModel):
    result: float


@toolset.tool(topic="math", workflow_name="add", name="math_add")
async def add(a: float, b: float) -> Sum:
    """Add two numbers and return the sum (as ``result``)."""
    return Sum(result=a + b)


@toolset.tool(topic="math", workflow_name="multiply", name="math_multiply")
async def multiply(a: float, b: float) -> Sum:
    """Multiply two numbers and return the product (as ``result``)."""
    return Sum(result=a * b)
