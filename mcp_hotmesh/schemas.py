"""Registered tool definitions are untrusted data: their bounds, and JSON Schema checks that retrieve nothing.

Any worker role writes the names, descriptions and schemas of its stream's tools, and every gateway reads them
(DESIGN.md: a scoped role is an adversary for availability too). So before anything recursive touches a
definition (``json.dumps``, jsonschema, pydantic, a client's parser) an iterative walk measures it against the
limits below, and the validator built from a schema resolves ``$ref`` only inside the schema itself: a
reference to a URL or a file is refused, never retrieved.

``check`` is the whole verdict on one tool: it can take seconds on a schema near the limits (the metaschema check
costs about 0.2 ms a value), so the engine runs it in a worker thread, once per distinct definition.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry

from ._postgres import UnreadableJSON

# The limits on one registered tool. The database enforces the same values at registration (its settings
# max_schema_depth, max_schema_nodes, max_description_chars); the gateway checks them again because rows written
# before those limits existed, or by an admin by hand, reach it too. Change them together.
MAX_SCHEMA_DEPTH = 32
"""Deepest nesting of one schema: the schema object itself is at depth 1, a value inside an object or an array
is one deeper than it. Deep enough for any generated schema (pydantic nests models through ``$defs``), shallow
enough that jsonschema's recursion stays far from Python's limit."""
MAX_SCHEMA_NODES = 10_000
"""Most values in one schema (objects, arrays, strings, numbers, booleans, nulls; keys are not counted). The
metaschema check is linear in this: about 2 s of one core at the limit."""
MAX_DESCRIPTION_CHARS = 10_000
"""Longest tool description, in characters."""

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what Claude accepts; the database enforces it too

# Validators resolve references through this registry: empty, and with no way to retrieve what it lacks, so a
# reference that is not inside the schema is an error (``referencing.exceptions.Unresolvable``), never a fetch.
# jsonschema's default registry would fetch any http(s) or file URL, on the event loop, with no timeout.
NO_RETRIEVAL: Registry[Any] = Registry()

_REFERENCES = ("$ref", "$dynamicRef")


@dataclass(frozen=True, slots=True)
class Checked:
    """The verdict on one tool definition: ``problem`` says why the tool can be neither listed nor called (for the
    agent, no internals); otherwise ``validator`` checks its arguments. ``key`` identifies the definition."""

    key: str
    problem: str | None
    validator: Draft202012Validator | None = None


def measure(value: object, what: str) -> str | None:
    """Why ``value`` is not plain JSON within the limits, or None. Iterative, and it stops at the first value
    past a limit, so its cost is bounded whatever the row holds."""
    stack: list[tuple[object, int]] = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > MAX_SCHEMA_DEPTH:
            return f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep"
        if isinstance(item, (dict, list)):
            if seen + len(stack) + len(item) > MAX_SCHEMA_NODES:  # before pushing a million children
                return f"{what} holds more than {MAX_SCHEMA_NODES} values"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
            if isinstance(item, dict) and not all(isinstance(k, str) for k in item):
                return f"{what} is not plain JSON"
        elif isinstance(item, UnreadableJSON):  # PostgreSQL reads it, Python cannot
            return f"{what} cannot be read: {item.reason}"
        elif isinstance(item, float) and not math.isfinite(item):  # 1e400 in jsonb is inf in Python
            return f"{what} holds a number out of range"
        elif not (item is None or isinstance(item, (str, int, float))):  # bool is an int
            return f"{what} is not plain JSON"
    return None


def outside_reference(schema: object) -> str | None:
    """The first ``$ref`` or ``$dynamicRef`` that does not point inside the schema (does not start with ``#``),
    or None. Call it only on a value ``measure`` accepted (it walks the whole value)."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for keyword in _REFERENCES:
                target = item.get(keyword)
                if isinstance(target, str) and not target.startswith("#"):
                    return target
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def bounds(name: object, description: object, input_schema: object, output_schema: object) -> str | None:
    """Why a tool definition is past the limits or no plain JSON, or None."""
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        return "its registered name is not a valid tool name"
    if not isinstance(description, str):
        return "its registered description is not text"
    if len(description) > MAX_DESCRIPTION_CHARS:
        return f"its registered description is longer than {MAX_DESCRIPTION_CHARS} characters"
    for what, schema in (("input", input_schema), ("output", output_schema)):
        if schema is None and what == "output":
            continue
        problem = measure(schema, f"its registered {what} schema")
        if problem is not None:
            return problem
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f'its registered {what} schema is not a JSON Schema object with "type": "object"'
    return None


def definition_key(name: object, description: object, input_schema: object, output_schema: object,
                   problem: str | None) -> str:
    """A digest of a tool definition, for the verdict cache and for telling whether the catalog changed. Never
    raises: a definition past the limits (``problem``) is never encoded, only its name and what is wrong."""
    if problem is None:
        text = json.dumps([name, description, input_schema, output_schema], sort_keys=True)
    else:
        text = json.dumps(["unusable", str(name)[:100], problem])
    return hashlib.sha256(text.encode()).hexdigest()


def check(key: str, problem: str | None, input_schema: Any, output_schema: Any) -> Checked:
    """The verdict on a definition whose ``bounds`` gave ``problem``. Slow on large schemas: run it in a thread."""
    if problem is not None:
        return Checked(key, problem)
    for what, schema in (("input", input_schema), ("output", output_schema)):
        if schema is None:
            continue
        if outside_reference(schema) is not None:
            return Checked(key, f"its registered {what} schema refers to a schema outside itself (only references "
                                "starting with '#' are resolved)")
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            message = exc.message if len(exc.message) <= 200 else exc.message[:197] + "..."
            return Checked(key, f"its registered {what} schema is invalid ({message})")
        except Exception:  # bounded above, so unexpected: still one tool's problem, never the catalog's
            return Checked(key, f"its registered {what} schema could not be checked")
    return Checked(key, None, Draft202012Validator(input_schema, registry=NO_RETRIEVAL))
