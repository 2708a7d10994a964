"""The aliases and the one text helper the whole package shares (one definition each)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

JSON = Any
"""A value as JSON carries it: dict, list, str, int, float, bool or None (nested)."""

Kind = Literal["worker", "caller"]
"""The two kinds of scoped role: a worker consumes and answers, a caller (a gateway) makes calls."""

ProgressReport = Callable[[float, float | None, str | None], Awaitable[None]]
"""``report(progress, total, message)``: how far along a call is, from a handler to the agent."""


CONTENT_KEY = "$mcp_content"
"""The key that marks a rich result on the queue (``_content``): a JSON object holding it carries content blocks."""


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, with "..." where it was cut."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."
