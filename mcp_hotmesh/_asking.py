"""The gateway asks the agent's client a handler's question, with the ``mcp`` SDK: elicitation and sampling.

The question was checked already (``_questions.question_problem``). The request goes out on the tool call's own
request (``related_request_id``: on Streamable HTTP it rides the call's response stream), within the call's
time. Whatever goes wrong (no capability, a protocol era without server-to-client requests, a timeout, an error,
an answer that is no valid result) becomes an "unavailable" answer with a reason the agent can act on: the
handler never waits in vain and this never raises.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import anyio
import pydantic
from mcp import MCPError
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning, NoBackChannelError
from mcp.types import (
    ClientCapabilities,
    ElicitationCapability,
    SamplingCapability,
    SamplingMessage,
    TextContent,
)

from ._common import JSON, clip
from ._question_line import Asker
from ._questions import unavailable

log = logging.getLogger(__name__)

NO_ELICITATION = ("This tool needs to ask the user for input, but the MCP client does not support elicitation "
                  "(form requests). Tell the user this tool cannot be used from this client.")
NO_SAMPLING = ("This tool needs a completion from the client's model, but the MCP client does not support "
               "sampling. Tell the user this tool cannot be used from this client.")
NO_BACK_CHANNEL = ("This tool needs to ask the client something, but this connection cannot carry requests from "
                   "the server to the client (protocol {version}). Tell the user this tool needs a client that "
                   "supports elicitation or sampling over a 2025-era connection.")


def asker_for(ctx: ServerRequestContext[Any, Any]) -> Asker:
    """Asks questions of the client that made the request of ``ctx``."""

    async def ask(kind: str, request: dict[str, JSON], seconds: float) -> dict[str, JSON]:
        try:
            with anyio.fail_after(seconds):
                if kind == "elicit":
                    return await _elicit(ctx, request)
                return await _sample(ctx, request)
        except NoBackChannelError:
            return unavailable(NO_BACK_CHANNEL.format(version=ctx.protocol_version))
        except TimeoutError:
            return unavailable("The user did not answer in time; the call's time ran out.")
        except MCPError as exc:
            return unavailable(f"The client refused the request: {clip(exc.message, 300)}")
        except (pydantic.ValidationError, TypeError, ValueError, KeyError) as exc:
            log.info("a client's answer to a %s request could not be read: %s", kind, type(exc).__name__)
            return unavailable("The client's answer could not be read.")

    return ask


async def _elicit(ctx: ServerRequestContext[Any, Any], request: dict[str, JSON]) -> dict[str, JSON]:
    if not ctx.session.check_client_capability(ClientCapabilities(elicitation=ElicitationCapability())):
        return unavailable(NO_ELICITATION)
    result = await ctx.session.elicit_form(request["message"], request["requestedSchema"],
                                           related_request_id=ctx.request_id)
    answer: dict[str, JSON] = {"action": result.action}
    if result.action == "accept":
        answer["content"] = result.content or {}
    return answer


async def _sample(ctx: ServerRequestContext[Any, Any], request: dict[str, JSON]) -> dict[str, JSON]:
    if not ctx.session.check_client_capability(ClientCapabilities(sampling=SamplingCapability())):
        return unavailable(NO_SAMPLING)
    messages = [SamplingMessage(role=m["role"], content=TextContent(text=m["content"]["text"]))
                for m in request["messages"]]
    with warnings.catch_warnings():  # deprecated in the 2026 era, where it is never sent (no back channel there)
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        result = await ctx.session.create_message(
            messages, max_tokens=request["maxTokens"], system_prompt=request.get("systemPrompt"),
            temperature=request.get("temperature"), related_request_id=ctx.request_id)
    content = result.content
    block = content[0] if isinstance(content, list) and content else content
    return {"action": "accept", "model": result.model, "stopReason": result.stop_reason,
            "content": block.model_dump(by_alias=True, mode="json", exclude_none=True)}
