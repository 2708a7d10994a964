"""Questions a running handler asks the calling client, through the queue: elicitation and sampling.

    answer = await ctx.elicit("Ship to which address?", {"type": "object", "properties": {
        "street": {"type": "string"}, "city": {"type": "string"}}, "required": ["street", "city"]})
    if answer.action == "accept":
        ...answer.content["city"]...

The worker, holding the call's lease, posts the question on its call (``worker_request``: one pending question per
call, bounded in size); the gateway waiting for the call hears of it (``q:<call id>`` on its role's channel),
checks it as hostile input (``question_problem``: what MCP allows, bounded), asks its client and posts the answer
(``caller_answer``, only for the role that made the call), which wakes the worker (``e:<message id>`` on the
stream's channel; a slow poll covers a lost NOTIFY). The call's deadline and cancellation stop the handler while
it waits, as anywhere else. A client that cannot answer (no elicitation or sampling capability, a protocol era
without server-to-client requests, an error) makes ``ctx.elicit`` raise ``CannotAsk``, a ``ToolError``: uncaught,
the agent reads why as the tool's error result.

What travels (JSON): an elicitation is ``{"message", "requestedSchema"}``; a sampling request ``{"messages",
"maxTokens", "systemPrompt"?, "temperature"?}`` of text messages; an answer ``{"action": "accept" | "decline" |
"cancel", "content"?}`` (sampling: ``{"action": "accept", "content", "model", "stopReason"}``) or ``{"action":
"unavailable", "message"}``. The worker checks the answer against its own question before the handler sees it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import anyio
import jsonschema
from pydantic import BaseModel

from ._common import JSON, clip
from .errors import CannotAsk, LeaseLost

ANSWER_POLL = 2.0
"""Seconds between two looks for an answer when no NOTIFY came (a lost one)."""
MAX_MESSAGE_CHARS = 4000
MAX_FIELDS = 50
MAX_TEXT_CHARS = 1000
MAX_CHOICES = 100
MAX_SAMPLING_MESSAGES = 50
MAX_SAMPLING_CHARS = 32_000
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FORMATS = {"email", "uri", "date", "date-time"}
_COMMON = {"type", "title", "description", "default"}
_ALLOWED = {
    "string": _COMMON | {"minLength", "maxLength", "format", "enum", "enumNames", "oneOf"},
    "number": _COMMON | {"minimum", "maximum"},
    "integer": _COMMON | {"minimum", "maximum"},
    "boolean": _COMMON,
    "array": _COMMON | {"items", "minItems", "maxItems"},
}


# ---------------------------------------------------------------------------------- what a question may hold
def _text(value: Any, limit: int = MAX_TEXT_CHARS) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1_000_000


def _choices(value: Any) -> bool:
    return (isinstance(value, list) and 0 < len(value) <= MAX_CHOICES and all(_text(v, 200) for v in value)
            and len(set(value)) == len(value))


def _titled(value: Any) -> bool:
    return (isinstance(value, list) and 0 < len(value) <= MAX_CHOICES and all(
        isinstance(v, dict) and set(v) <= {"const", "title"} and _text(v.get("const"), 200)
        and _text(v.get("title"), 200) for v in value))


def _field_problem(name: str, prop: Any) -> str | None:
    if not isinstance(prop, dict):
        return f"field {name!r} is not an object"
    kind = prop.get("type")
    if kind not in _ALLOWED:
        return f"field {name!r} has type {clip(str(kind), 40)!r}; a field is a string, number, integer, boolean or " \
               "an array of choices"
    extra = set(prop) - _ALLOWED[kind]
    if extra:
        return f"field {name!r} has keywords an elicitation may not use: {', '.join(sorted(map(str, extra))[:5])}"
    for key in ("title", "description"):
        if key in prop and not _text(prop[key]):
            return f"field {name!r}: {key} is not a string of at most {MAX_TEXT_CHARS} characters"
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in prop and not _count(prop[key]):
            return f"field {name!r}: {key} is not a count"
    for key in ("minimum", "maximum"):
        if key in prop and not _number(prop[key]):
            return f"field {name!r}: {key} is not a finite number"
    if "format" in prop and prop["format"] not in _FORMATS:
        return f"field {name!r}: format is one of {', '.join(sorted(_FORMATS))}"
    if "enum" in prop and not _choices(prop["enum"]):
        return f"field {name!r}: enum is not a list of distinct short strings"
    if "enumNames" in prop and not (_choices(prop["enumNames"]) and "enum" in prop
                                    and len(prop["enumNames"]) == len(prop["enum"])):
        return f"field {name!r}: enumNames does not name each enum value"
    if "oneOf" in prop and not _titled(prop["oneOf"]):
        return f"field {name!r}: oneOf is not a list of {{const, title}} choices"
    if kind == "array":
        items = prop.get("items")
        if not isinstance(items, dict) or not (
                (set(items) <= {"type", "enum"} and items.get("type") == "string" and _choices(items.get("enum")))
                or (set(items) == {"anyOf"} and _titled(items["anyOf"]))):
            return f"field {name!r}: an array is a multiple choice (items: a string enum, or anyOf const/title)"
    if "default" in prop and not _default_fits(kind, prop["default"]):
        return f"field {name!r}: its default is not a {kind}"
    return None


def _default_fits(kind: str, value: Any) -> bool:
    if kind == "string":
        return _text(value, MAX_TEXT_CHARS)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return _number(value)
    return isinstance(value, list) and len(value) <= MAX_CHOICES and all(_text(v, 200) for v in value)


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is no elicitation schema MCP allows (a flat object of primitive fields), or None."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return "the requested schema is not an object schema"
    extra = set(schema) - {"type", "properties", "required", "title", "description", "$schema"}
    if extra:
        return f"the requested schema has keywords an elicitation may not use: {', '.join(sorted(extra)[:5])}"
    props = schema.get("properties")
    if not isinstance(props, dict) or not 0 < len(props) <= MAX_FIELDS:
        return f"the requested schema has no properties, or more than {MAX_FIELDS}"
    for name, prop in props.items():
        if not _FIELD_NAME.fullmatch(name):
            return f"field name {clip(name, 40)!r} is not 1 to 64 letters, digits, '_', '.' or '-'"
        problem = _field_problem(name, prop)
        if problem is not None:
            return problem
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) and r in props for r in required):
        return "required names fields the schema does not have"
    for key in ("title", "description"):
        if key in schema and not _text(schema[key]):
            return f"the schema's {key} is not a string of at most {MAX_TEXT_CHARS} characters"
    return None


def _sampling_problem(request: dict[str, Any]) -> str | None:
    extra = set(request) - {"messages", "maxTokens", "systemPrompt", "temperature"}
    if extra:
        return f"the sampling request has fields this server does not forward: {', '.join(sorted(extra)[:5])}"
    messages = request.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_SAMPLING_MESSAGES:
        return f"a sampling request holds 1 to {MAX_SAMPLING_MESSAGES} messages"
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if (not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ("user", "assistant")
                or not isinstance(content, dict) or set(content) != {"type", "text"} or content["type"] != "text"
                or not _text(content["text"], MAX_SAMPLING_CHARS)):
            return "each sampling message is a user or assistant text of bounded length"
    tokens = request.get("maxTokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 < tokens <= 100_000:
        return "maxTokens is a count from 1 to 100000"
    if "systemPrompt" in request and not _text(request["systemPrompt"], MAX_SAMPLING_CHARS):
        return "systemPrompt is not a string of bounded length"
    if "temperature" in request and not (_number(request["temperature"]) and 0 <= request["temperature"] <= 2):
        return "temperature is not a number from 0 to 2"
    return None


def question_problem(kind: str, request: Any) -> str | None:
    """Why a question from the queue must not reach the client (it is hostile input from the worker role)."""
    if not isinstance(request, dict):
        return "the question is not a JSON object"
    if kind == "sample":
        return _sampling_problem(request)
    if kind != "elicit":
        return "the question is of an unknown kind"
    if set(request) != {"message", "requestedSchema"} or not _text(request["message"], MAX_MESSAGE_CHARS):
        return f"an elicitation is a message of at most {MAX_MESSAGE_CHARS} characters and a requested schema"
    return schema_problem(request["requestedSchema"])


def unavailable(message: str) -> dict[str, JSON]:
    """The answer that says the client cannot answer, and why (for the handler and, uncaught, the agent)."""
    return {"action": "unavailable", "message": message}


# ------------------------------------------------------------------------------------------------- worker side
@dataclass(frozen=True)
class Elicited:
    """The user's answer to ``ctx.elicit``: ``accept`` (with ``content``, of the requested schema), ``decline``
    or ``cancel``. With a pydantic model as the schema, ``data`` is the content as that model."""

    action: Literal["accept", "decline", "cancel"]
    content: dict[str, Any] | None = None
    data: Any = None


@dataclass(frozen=True)
class Sampled:
    """The client model's answer to ``ctx.sample``: its ``text`` (empty when it answered other than in text),
    the model's name, why it stopped, and the content block as the client sent it."""

    text: str
    model: str
    stop_reason: str | None
    content: dict[str, Any]


class Questions:
    """A running handler's line to its caller: post a question, wait for the answer (NOTIFY, or a slow poll)."""

    def __init__(self, api: Any, stream: str, message_id: int, lease: UUID, *, poll: float = ANSWER_POLL) -> None:
        self.api = api  # a WorkerAPI
        self.stream = stream
        self.message_id = message_id
        self.lease = lease
        self.poll = poll
        self._lock = anyio.Lock()  # one pending question per call: a handler's tasks ask in turn
        self._answered = anyio.Event()

    def wake(self) -> None:
        """An answer was posted (``e:<message id>``)."""
        self._answered.set()

    async def ask(self, kind: str, request: dict[str, JSON]) -> dict[str, Any]:
        async with self._lock:
            seq = await self.api.request(self.stream, self.message_id, self.lease, kind, request)
            if seq is None:
                raise LeaseLost("the call's lease was lost; another worker may be handling it")
            while True:
                self._answered = anyio.Event()
                answer = await self.api.request_answer(self.stream, self.message_id, self.lease, seq)
                if answer is not None:
                    break
                with anyio.move_on_after(self.poll):
                    await self._answered.wait()
        if not isinstance(answer, dict):
            raise CannotAsk("the client's answer could not be read")
        if answer.get("action") == "unavailable":
            why = answer.get("message")
            raise CannotAsk(clip(why, 500) if isinstance(why, str) and why else "the client cannot answer")
        return answer


def _no_line() -> CannotAsk:
    return CannotAsk("this call has no client to ask (it was not made through a gateway)")


async def elicit(questions: Questions | None, message: str, schema: dict[str, Any] | type[BaseModel]) -> Elicited:
    model = schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None
    requested: dict[str, Any] = schema if not isinstance(schema, type) else {  # a model's own title, and its
        k: v for k, v in schema.model_json_schema().items() if k not in ("title", "additionalProperties")}  # extra
    problem = schema_problem(requested) or (None if _text(message, MAX_MESSAGE_CHARS)
                                            else f"the message is longer than {MAX_MESSAGE_CHARS} characters")
    if problem is not None:  # the handler's own mistake: said before anything is sent
        raise ValueError(f"ctx.elicit: {problem}")
    if questions is None:
        raise _no_line()
    answer = await questions.ask("elicit", {"message": message, "requestedSchema": requested})
    action = answer.get("action")
    if action in ("decline", "cancel"):
        return Elicited(action)
    content = answer.get("content")
    if action != "accept" or not isinstance(content, dict):
        raise CannotAsk("the client's answer to the question could not be read")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(requested).iter_errors(content))
    if error is not None:
        raise CannotAsk(f"the client's answer does not fit the question: {clip(error.message, 200)}")
    return Elicited("accept", content, model.model_validate(content) if model is not None else None)


async def sample(questions: Questions | None, prompt: str | list[dict[str, Any]], *, max_tokens: int,
                 system_prompt: str | None, temperature: float | None) -> Sampled:
    messages = ([{"role": "user", "content": {"type": "text", "text": prompt}}] if isinstance(prompt, str)
                else prompt)
    request: dict[str, JSON] = {"messages": messages, "maxTokens": max_tokens}
    if system_prompt is not None:
        request["systemPrompt"] = system_prompt
    if temperature is not None:
        request["temperature"] = temperature
    problem = _sampling_problem(request)
    if problem is not None:
        raise ValueError(f"ctx.sample: {problem}")
    if questions is None:
        raise _no_line()
    answer = await questions.ask("sample", request)
    content, model = answer.get("content"), answer.get("model")
    if answer.get("action") != "accept" or not isinstance(content, dict) or not isinstance(model, str):
        raise CannotAsk("the client's answer to the sampling request could not be read")
    text = content.get("text") if content.get("type") == "text" else ""
    stop = answer.get("stopReason")
    return Sampled(text if isinstance(text, str) else "", clip(model, 200),
                   stop if isinstance(stop, str) else None, content)

