"""An example tool set for mcp-hotmesh: ``mcp-hotmesh serve --tools examples/agents/tools.py:toolset``.

A tool is a typed Python function registered on a ``ToolSet``:

* its **parameters** become the tool's input JSON Schema (``Annotated[..., Field(...)]`` adds bounds and the
  description the model sees for each argument). The gateway checks every call against this schema before
  anything is queued, and the worker checks again before the handler runs;
* its **return type** becomes the output schema; the value is returned to the agent as structured content;
* its **docstring** is the description the model reads to decide when and how to call it: say what the tool
  does, what it returns and when it fails;
* ``topic`` is the PostgreSQL stream it is served on. Roles are scoped to streams: a worker role may serve, and
  a caller role may call, only the topics it was provisioned for. Several tools can share one topic under
  different ``workflow_name`` values (``math_add`` and ``math_multiply`` below);
* a parameter typed ``ToolContext`` is not an argument: it gives the handler ``report_progress``, ``attempt``
  (0 on the first try) and the call's ``deadline``. Cancellation arrives at the handler's next ``await``.

A handler that raises is retried with backoff (``RetryPolicy``: 3 attempts by default); the agent gets the
exception's message (never a traceback) once the attempts are used up.

This file reuses the package's own examples (``echo``, ``sleep``, ``flaky``, ``math_add``, ``math_multiply``;
read ``mcp_hotmesh/examples.py``) and adds one tool of its own, ``word_count``, written out here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from mcp_hotmesh import ToolContext, ToolSet
from mcp_hotmesh.examples import toolset as package_examples

# Start from the package's examples; add your own tools with @toolset.tool below.
toolset = ToolSet(list(package_examples.tools))


class WordCount(BaseModel):
    """The output schema: the agent receives exactly these fields as structured content."""

    words: int = Field(description="number of words (runs of non-space characters)")
    lines: int = Field(description="number of lines")
    top: list[str] = Field(description="the most frequent words, most frequent first")


@toolset.tool(topic="text.stats")  # on the stream "text.stats", named after the function: word_count
async def word_count(
    text: Annotated[str, Field(min_length=1, max_length=100_000, description="the text to analyse")],
    top: Annotated[int, Field(ge=0, le=50, description="how many of the most frequent words to return")] = 5,
    ctx: ToolContext | None = None,
) -> WordCount:
    """Count the words and lines of a text and list its most frequent words (case-insensitive).

    Returns ``words``, ``lines`` and ``top``. Use it for quick statistics about a document the user gave you.
    """
    words = text.lower().split()
    counts: dict[str, int] = {}
    for i, word in enumerate(words, 1):
        counts[word] = counts.get(word, 0) + 1
        if ctx is not None and i % 10_000 == 0:  # long inputs report progress
            await ctx.report_progress(i, len(words), "counting words")
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[:top]
    return WordCount(words=len(words), lines=len(text.splitlines()) or 1, top=ranked)
