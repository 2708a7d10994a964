"""Tools as typed Python: an async function with typed parameters (or one pydantic model) and a typed result.

    toolset = ToolSet()

    @toolset.tool(topic="order.process", annotations={"destructiveHint": False}, timeout=120)
    async def place_order(sku: str, quantity: int = 1, ctx: ToolContext | None = None) -> Receipt:
        \"\"\"Place an order for a product. Returns the receipt; fails if the SKU is unknown.\"\"\"

The parameters give the input JSON Schema, the return annotation the output schema, the docstring the
description the model reads. The tool's name is the function's name and its topic the tool's name unless
given. A tool serves one topic (stream) and, optionally, one workflow name: several tools can share a topic,
each under its own workflow name, and one consumer per topic dispatches between them. ``title``,
``annotations``, ``icons``, ``meta`` and ``timeout`` are registered with the definition and sent in
``tools/list``; ``retry`` and ``retry_on`` say how the worker retries a handler that raised.
The worker registers each tool (``worker_register_definition``) and validates the arguments again before the
handler runs: it never trusts the queue.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, get_type_hints, overload

import anyio
import pydantic
import pydantic_core
from pydantic import BaseModel, TypeAdapter

from . import _questions
from ._common import CONTENT_KEY, JSON, ProgressReport
from ._config import TOOL_NAME_PATTERN, RetryPolicy, check_stream
from ._postgres import UnreadableJSON
from ._questions import Elicited, Questions, Sampled
from .errors import ConfigError, ToolInputError, ToolOutputError

_F = TypeVar("_F", bound=Callable[..., Any])


class ToolContext:
    """What a running handler may use: progress reports, the deadline, whether it was cancelled, and which call
    and attempt this is.

    ``call_id`` names the call, the same on every attempt and after a reclaim (a worker that died mid-call):
    give it to a payment service or any API as the idempotency key of the side effect, so a call that runs
    twice has its effect once. ``attempt`` is 0 on the first run and counts the attempts that raised before.
    Cancellation itself arrives as an anyio cancellation at the handler's next ``await``; ``cancelled`` is for
    handlers that want to look.
    """

    def __init__(
        self,
        *,
        attempt: int = 0,
        deadline: datetime | None = None,
        progress: ProgressReport | None = None,
        workflow_name: str = "",
        topic: str = "",
        call_id: str = "",
        questions: Questions | None = None,
    ) -> None:
        self.attempt = attempt
        self.call_id = call_id
        self.deadline = deadline
        self.workflow_name = workflow_name
        self.topic = topic
        self.cancelled = anyio.Event()
        self._progress = progress
        self._questions = questions

    async def report_progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        """Tell the caller how far along the call is (``progress`` only grows). Forwarded to the agent."""
        if self._progress is not None:
            await self._progress(progress, total, message)

    async def elicit(self, message: str, schema: dict[str, Any] | type[BaseModel]) -> Elicited:
        """Ask the user of the calling client to fill in a form: ``schema`` is a flat object of string, number,
        integer, boolean or multiple-choice fields (a JSON Schema, or a pydantic model of such fields). Returns
        the answer (``accept`` with its content, ``decline`` or ``cancel``); waits within the call's deadline.
        Raises ``CannotAsk`` when the client cannot answer (uncaught, the agent is told why)."""
        return await _questions.elicit(self._questions, message, schema)

    async def sample(self, prompt: str | list[dict[str, Any]], *, max_tokens: int = 1000,
                     system_prompt: str | None = None, temperature: float | None = None) -> Sampled:
        """Ask the calling client's model for a completion of ``prompt`` (text, or MCP sampling messages of
        text). Raises ``CannotAsk`` when the client cannot (or will not) sample."""
        return await _questions.sample(self._questions, prompt, max_tokens=max_tokens,
                                       system_prompt=system_prompt, temperature=temperature)


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]


@dataclass
class Tool:
    """One tool: a handler and the schemas derived from it."""

    fn: Callable[..., Any]
    name: str
    description: str
    topic: str
    workflow_name: str
    input_model: type[BaseModel]
    output_adapter: TypeAdapter[Any] | None
    wraps_output: bool  # a non-object result travels as {"result": value}
    context_param: str | None
    single_model_param: str | None = None
    title: str | None = None
    annotations: dict[str, Any] | None = None  # readOnlyHint, destructiveHint, idempotentHint, openWorldHint
    icons: list[dict[str, Any]] | None = None
    meta: dict[str, Any] | None = None
    timeout: float | None = None  # seconds; the gateway's --timeout when None
    retry: RetryPolicy | None = None  # the worker's policy when None
    retry_on: tuple[type[BaseException], ...] | None = None  # None: every exception but ToolError is retried
    _input_adapter: TypeAdapter[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._input_adapter = TypeAdapter(self.input_model)

    @property
    def input_schema(self) -> dict[str, Any]:
        schema = self.input_model.model_json_schema()
        schema.setdefault("type", "object")
        schema.pop("title", None)
        return schema

    @property
    def output_schema(self) -> dict[str, Any] | None:
        if self.output_adapter is None:
            return None
        schema = self.output_adapter.json_schema()
        if self.wraps_output:
            defs = schema.pop("$defs", None)
            schema = {"type": "object", "properties": {"result": schema}, "required": ["result"]}
            if defs:
                schema["$defs"] = defs
        schema.pop("title", None)
        return schema

    def registration(self) -> dict[str, Any]:
        """What ``worker_register_tool`` stores for this tool (and an admin approves)."""
        definition: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
        }
        extras = {"title": self.title, "annotations": self.annotations, "icons": self.icons, "meta": self.meta,
                  "timeout_ms": None if self.timeout is None else max(1, round(self.timeout * 1000))}
        definition.update({k: v for k, v in extras.items() if v is not None})
        return definition

    def parse_arguments(self, args: JSON) -> BaseModel:
        """Validate arguments from the queue; ``ToolInputError`` says what is wrong, for the model to fix."""
        if isinstance(args, UnreadableJSON):
            raise ToolInputError(f"the arguments could not be read: {args.reason}")
        if not isinstance(args, dict):
            raise ToolInputError("the arguments must be a JSON object")
        try:
            return self.input_model.model_validate(args)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}" for e in exc.errors()[:10]
            )
            raise ToolInputError(f"invalid arguments: {problems}") from None

    async def invoke(self, args: JSON, ctx: ToolContext) -> JSON:
        """Validate ``args``, run the handler, return its result as JSON (an object)."""
        parsed = self.parse_arguments(args)
        if self.single_model_param is not None:
            kwargs: dict[str, Any] = {self.single_model_param: parsed}
        else:
            kwargs = {name: getattr(parsed, name) for name in type(parsed).model_fields}
        if self.context_param is not None:
            kwargs[self.context_param] = ctx
        if inspect.iscoroutinefunction(self.fn):
            value = await self.fn(**kwargs)
        else:
            value = await anyio.to_thread.run_sync(lambda: self.fn(**kwargs))
        return self.dump_result(value)

    def dump_result(self, value: Any) -> JSON:
        if "mcp_types" in sys.modules:  # content blocks are the SDK's types: without them loaded, there are none
            from . import _content

            try:
                rich = _content.encode(value)  # text, images, audio, resources
            except (TypeError, ValueError) as exc:  # structured content beside them that is no JSON
                raise ToolOutputError(f"tool {self.name!r} returned an invalid result: {_short(exc)}") from None
            if rich is not None:
                return rich
        try:
            if self.output_adapter is not None:
                value = self.output_adapter.validate_python(value)
                dumped = self.output_adapter.dump_python(value, mode="json")
            else:
                dumped = TypeAdapter(Any).dump_python(value, mode="json")
        except (pydantic.ValidationError, pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            raise ToolOutputError(f"tool {self.name!r} returned an invalid result: {_short(exc)}") from None
        if self.wraps_output or not isinstance(dumped, dict):
            return {"result": dumped}
        if CONTENT_KEY in dumped:  # a plain result that holds the key of rich ones
            from . import _content

            return _content.escape(dumped)
        return dumped


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()
    return text[0][:300] if text else type(exc).__name__


def _returns_content(annotation: Any) -> bool:
    from . import _content

    return _content.is_content_annotation(annotation)


def _is_context(annotation: Any) -> bool:
    if annotation is ToolContext:
        return True
    args = getattr(annotation, "__args__", ())
    return ToolContext in args


def _is_object_type(tp: Any) -> bool:
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return True
    origin = getattr(tp, "__origin__", None)
    if tp is dict or origin is dict:
        return True
    from typing import is_typeddict

    return bool(is_typeddict(tp))


ANNOTATION_HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


def _as_json_object(value: Any, what: str) -> dict[str, Any]:
    """A dict, or an MCP SDK model (``ToolAnnotations``, ``Icon``) as its JSON (by alias, unset fields left out)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a dict or an mcp.types model, not {type(value).__name__}")
    return value


def _annotations(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    hints = _as_json_object(value, "annotations")
    for key, hint in hints.items():
        if key == "title":
            if not isinstance(hint, str):
                raise ConfigError("annotations: title must be a string")
        elif key not in ANNOTATION_HINTS:
            raise ConfigError(f"annotations: unknown hint {key!r}; the hints are {', '.join(ANNOTATION_HINTS)}")
        elif not isinstance(hint, bool):
            raise ConfigError(f"annotations: {key} must be true or false")
    return hints


def _icons(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    icons = [_as_json_object(icon, "an icon") for icon in value]
    for icon in icons:
        src = icon.get("src")
        if not isinstance(src, str) or not src.startswith(("https://", "data:image/")):
            raise ConfigError("an icon's src must be an https: URL or a data:image/ URI")
    return icons


def make_tool(
    fn: Callable[..., Any],
    *,
    topic: str | None = None,
    name: str | None = None,
    description: str | None = None,
    workflow_name: str = "",
    title: str | None = None,
    annotations: Any = None,
    icons: Any = None,
    meta: dict[str, Any] | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
) -> Tool:
    """Build a ``Tool`` from a typed function: named after it and on the topic of its name unless told."""
    name = name or fn.__name__
    if not TOOL_NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"tool name {name!r} must match ^[A-Za-z0-9_-]{{1,64}}$")
    topic = check_stream(topic or name)
    if timeout is not None and not 0 < timeout <= 86_400:
        raise ConfigError(f"tool {name!r}: timeout must be more than 0 and at most 86400 seconds")
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"tool {name!r}: meta must be a dict")
    if retry_on is not None and not all(isinstance(c, type) and issubclass(c, BaseException) for c in retry_on):
        raise ConfigError(f"tool {name!r}: retry_on must be a tuple of exception classes")
    description = (description or inspect.getdoc(fn) or "").strip()
    if not description:
        raise ConfigError(f"tool {name!r} needs a description: write a docstring for the model that will call it")
    hints = get_type_hints(fn, include_extras=True)
    signature = inspect.signature(fn)
    fields: dict[str, Any] = {}
    context_param = None
    single_model = None
    params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for p in params:
        annotation = hints.get(p.name, Any)
        if _is_context(annotation):
            context_param = p.name
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    if len(fields) == 1:
        (only, (annotation, _default)), = fields.items()
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            single_model = only
    if single_model is not None:
        input_model: type[BaseModel] = fields[single_model][0]
    else:
        input_model = pydantic.create_model(
            f"{_sanitize(name)}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields
        )
    returns = hints.get("return", Any)
    no_schema = returns in (Any, None, type(None)) or ("mcp_types" in sys.modules and _returns_content(returns))
    output_adapter = None if no_schema else TypeAdapter(returns)
    wraps = output_adapter is not None and not _is_object_type(returns)
    return Tool(
        fn=fn,
        name=name,
        description=description,
        topic=topic,
        workflow_name=workflow_name,
        input_model=input_model,
        output_adapter=output_adapter,
        wraps_output=wraps,
        context_param=context_param,
        single_model_param=single_model,
        title=title,
        annotations=_annotations(annotations),
        icons=_icons(icons),
        meta=meta,
        timeout=timeout,
        retry=retry,
        retry_on=None if retry_on is None else tuple(retry_on),
    )


class ToolSet:
    """A set of tools, each on a topic and optionally a workflow name; what a worker serves."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self.tools: list[Tool] = []
        for t in tools or []:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        for other in self.tools:
            if other.name == tool.name:
                raise ConfigError(f"two tools are named {tool.name!r}")
            if (other.topic, other.workflow_name) == (tool.topic, tool.workflow_name):
                raise ConfigError(
                    f"tools {other.name!r} and {tool.name!r} both serve topic {tool.topic!r} with the same "
                    "workflow name; give each its own workflow_name"
                )
        self.tools.append(tool)
        return tool

    @overload
    def tool(self, fn: _F, /) -> _F: ...

    @overload
    def tool(
        self,
        fn: None = None,
        /,
        *,
        topic: str | None = None,
        name: str | None = None,
        description: str | None = None,
        workflow_name: str = "",
        title: str | None = None,
        annotations: Any = None,
        icons: Any = None,
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[_F], _F]: ...

    def tool(
        self,
        fn: _F | None = None,
        /,
        *,
        topic: str | None = None,
        name: str | None = None,
        description: str | None = None,
        workflow_name: str = "",
        title: str | None = None,
        annotations: Any = None,
        icons: Any = None,
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
    ) -> _F | Callable[[_F], _F]:
        """Decorator: ``@toolset.tool`` or ``@toolset.tool(name=..., topic=..., title=..., annotations=...)``.

        ``name`` defaults to the function's name, ``topic`` to the name, the description to the docstring.
        ``title`` is the name a person reads; ``annotations`` the hints hosts use for permission prompts
        (``readOnlyHint``, ``destructiveHint``, ``idempotentHint``, ``openWorldHint``: a dict or
        ``mcp.types.ToolAnnotations``); ``icons`` a list of dicts or ``mcp.types.Icon`` (``https:`` or
        ``data:image/`` sources); ``meta`` the tool's ``_meta``; ``timeout`` the seconds a call may take (the
        gateway's ``--timeout`` otherwise, capped by the admin's ``max_tool_timeout_ms``). ``retry`` replaces the
        worker's ``RetryPolicy`` for this tool; with ``retry_on``, only those exceptions are retried and any other
        is dead-lettered at once. ``ToolError`` is never retried."""

        def register(f: _F) -> _F:
            self.add(make_tool(f, topic=topic, name=name, description=description, workflow_name=workflow_name,
                               title=title, annotations=annotations, icons=icons, meta=meta, timeout=timeout,
                               retry=retry, retry_on=retry_on))
            return f

        return register(fn) if fn is not None else register

    @property
    def topics(self) -> dict[str, list[Tool]]:
        """The tools grouped by topic, in the order they were added."""
        grouped: dict[str, list[Tool]] = {}
        for t in self.tools:
            grouped.setdefault(t.topic, []).append(t)
        return grouped

    def find(self, topic: str, workflow_name: str) -> Tool | None:
        for t in self.tools:
            if t.topic == topic and t.workflow_name == workflow_name:
                return t
        return None


def load_toolset(spec: str) -> ToolSet:
    """Load ``MODULE:ATTR`` or ``path/to/file.py:ATTR`` (a ``ToolSet``, or a list of tools)."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"--tools must be MODULE:ATTR or path/to/file.py:ATTR, not {spec!r}")
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"no such file: {target}")
            module_name = f"_hotmesh_tools_{abs(hash(str(path)))}"
            spec_ = importlib.util.spec_from_file_location(module_name, path)
            if spec_ is None or spec_.loader is None:
                raise ConfigError(f"cannot load {target}")
            module = importlib.util.module_from_spec(spec_)
            sys.modules[module_name] = module
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"could not import {target}: {type(exc).__name__}: {exc}") from exc
    value = getattr(module, attr, None)
    if isinstance(value, ToolSet):
        return value
    if isinstance(value, list) and all(isinstance(t, Tool) for t in value):
        return ToolSet(value)
    raise ConfigError(f"{spec} is not a ToolSet")
