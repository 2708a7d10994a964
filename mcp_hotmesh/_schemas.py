"""Registered tool definitions are untrusted data: their bounds, and JSON Schema checks that retrieve nothing.

Any worker role writes the names, descriptions and schemas of its stream's tools, and every gateway reads them
(DESIGN.md: a scoped role is an adversary for availability too). So before anything recursive touches a
definition (``json.dumps``, jsonschema, pydantic, a client's parser) an iterative walk measures it against the
limits below, and the validator built from a schema resolves ``$ref`` only inside the schema itself: a
reference to a URL or a file is refused, never retrieved.

``check`` is the whole verdict on one tool: it can take seconds on a schema near the limits (the metaschema check
costs about 0.2 ms a value), so the engine runs it in a worker thread, once per distinct definition.

A schema within every limit can still make checking arguments against it cost without end: ``allOf`` with two
``$ref``s to the next ``$defs`` entry, 25 entries deep, doubles the work at each level (minutes), and a pattern
like ``^(a+)+$`` backtracks exponentially in Python's ``re`` (which holds the GIL, so a thread does not help). So
``ArgumentValidator`` counts what it does in steps, each from a budget set per check (``validation_steps``), and
stops with ``TooCostly`` when the budget is spent; and its ``pattern`` and ``patternProperties`` run on RE2,
whose matching time is linear in the text (a pattern RE2 cannot compile, with lookaround or backreferences, makes
the tool unusable, with a clear problem).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from ._common import clip
from ._config import TOOL_NAME_PATTERN
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
    validator: ArgumentValidator | None = None
    output_for_hosts: dict[str, Any] | None = None  # see for_hosts


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
    if not isinstance(name, str) or not TOOL_NAME_PATTERN.fullmatch(name):
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
            return Checked(key, f"its registered {what} schema is invalid ({clip(exc.message, 200)})")
        except Exception:  # bounded above, so unexpected: still one tool's problem, never the catalog's
            return Checked(key, f"its registered {what} schema could not be checked")
    try:
        patterns = schema_patterns(input_schema)
    except UnusablePattern as exc:
        return Checked(key, f"its registered input schema has a pattern this server cannot apply in bounded time "
                            f"({clip(str(exc), 200)}; lookaround and backreferences are not supported)")
    output = for_hosts(output_schema) if isinstance(output_schema, dict) else None
    return Checked(key, None, ArgumentValidator(input_schema, patterns), output)


# ------------------------------------------------------------------------------------ output schemas for hosts
# Keywords whose cost the schema's author controls, on the host that checks a result against the schema: a
# pattern its regex engine may backtrack on for minutes (Python's re does), uniqueItems (quadratic), the
# unevaluated* walks (they follow every reference again). The MCP Python client checks every structured result
# against the tool's output schema, on its own event loop.
_HOST_COSTLY = frozenset({"pattern", "patternProperties", "uniqueItems", "unevaluatedProperties",
                          "unevaluatedItems", "$dynamicRef", "$dynamicAnchor", "$anchor", "$id", "$schema"})
_HOST_DEPTH = 2 * MAX_SCHEMA_DEPTH


def for_hosts(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The output schema as hosts get it in ``tools/list``: checkable in bounded time whatever the worker wrote.
    Local references are inlined (a cycle, or more than ``MAX_SCHEMA_NODES`` values once inlined: no schema),
    and the costly keywords are left out, which only ever makes the schema accept more (so a result the tool
    returns is never refused because of it). None: no output schema is listed; results still carry their
    structured content."""
    budget = [MAX_SCHEMA_NODES]

    def copy(node: Any, depth: int, seen: tuple[str, ...]) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > _HOST_DEPTH:
            raise _TooCostly
        if isinstance(node, list):
            return [copy(item, depth + 1, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in seen:
                raise _TooCostly  # a cycle: no finite schema says it
            target = _pointer(schema, ref)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            inlined = copy(target, depth + 1, (*seen, ref))
            if not rest:
                return inlined
            return {"allOf": [inlined, copy(rest, depth + 1, seen)]}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _HOST_COSTLY or (depth == 0 and key == "$defs"):
                continue
            if key == "additionalProperties" and "patternProperties" in node:
                continue  # it applied to what the patterns left: without them it would refuse more
            out[key] = copy(value, depth + 1, seen)
        return out

    try:
        result = copy(schema, 0, ())
    except (_TooCostly, LookupError, TypeError, ValueError):
        return None
    return result if isinstance(result, dict) else None


class _TooCostly(Exception):
    pass


def _pointer(root: Any, ref: str) -> Any:
    """What a local reference (``#``, ``#/$defs/Point``) points to; LookupError when it points nowhere."""
    if not ref.startswith("#"):
        raise LookupError(ref)
    node = root
    for part in (p for p in ref[1:].split("/") if p):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


# -------------------------------------------------------------------------------------------- patterns: RE2
class UnusablePattern(ValueError):
    """A ``pattern`` or ``patternProperties`` key RE2 cannot compile; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Regex:
    """A pattern compiled by RE2: ``search`` of a text's UTF-8 bytes takes time linear in their length, at worst
    about ``size`` (RE2's program size) times that."""

    pattern: str
    size: int
    search: Callable[[bytes], bool]


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported as the tool's problem, not as a line on stderr
# RE2's own entry point (``_Regexp.Match``): about 0.6 µs a search where the public ``search`` costs about 4 µs (it
# builds match objects and maps byte offsets back to characters). The public one is the fallback.
_UNANCHORED = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")


def compile_pattern(pattern: object) -> Regex:
    """``pattern`` compiled by RE2 (ECMA-262's ``\\uXXXX`` and Python's ``\\Z`` translated); raises
    ``UnusablePattern`` when RE2 cannot compile it (lookaround, backreferences, a repetition over 1000)."""
    if not isinstance(pattern, str):
        raise UnusablePattern(f"the pattern {clip(repr(pattern), 200)} is not a string")
    try:
        compiled = re2.compile(for_re2(pattern), _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise UnusablePattern(f"RE2 cannot compile the pattern {clip(repr(pattern), 200)}: {reason}") from None
    return Regex(pattern, int(compiled.programsize), _searcher(compiled))


def _searcher(compiled: Any) -> Callable[[bytes], bool]:
    match = getattr(getattr(compiled, "_regexp", None), "Match", None)
    if match is None or _UNANCHORED is None:
        return lambda data: compiled.search(data) is not None

    def search(data: bytes) -> bool:
        return bool(match(_UNANCHORED, data, 0, len(data))[0][0] != -1)

    return search


def for_re2(pattern: str) -> str:
    """A JSON Schema pattern (ECMA-262, which Python's ``re`` mostly reads too) in RE2's syntax: ``\\uXXXX`` (a
    surrogate pair too) becomes ``\\x{...}``, Python's ``\\Z`` RE2's ``\\z``, and ``[\\b]`` (a backspace in a
    class) ``\\x08``. The rest is left for RE2 to accept or refuse."""
    if "\\" not in pattern:
        return pattern
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e == "u" and _HEX4.fullmatch(pattern, i + 2, i + 6):
                code = int(pattern[i + 2:i + 6], 16)
                i += 6
                if (0xD800 <= code < 0xDC00 and pattern.startswith("\\u", i) and _HEX4.fullmatch(pattern, i + 2, i + 6)
                        and 0xDC00 <= (low := int(pattern[i + 2:i + 6], 16)) < 0xE000):
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
                out.append(f"\\x{{{code:X}}}")
                continue
            out.append("\\z" if e == "Z" and not in_class else "\\x08" if e == "b" and in_class else c + e)
            i += 2
            continue
        out.append(c)
        i += 1
        if c == "[" and not in_class:
            in_class = True
            if pattern.startswith("^", i):  # [^ ... and a ] right after [ or [^ is a literal ]
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("]")
                i += 1
        elif c == "]" and in_class:
            in_class = False
    return "".join(out)


def schema_patterns(schema: Any) -> dict[str, Regex]:
    """Every ``pattern`` and ``patternProperties`` key in the schema's subschemas, compiled by RE2; raises
    ``UnusablePattern`` for the first RE2 cannot compile. Patterns elsewhere (in a ``default``, say, that a
    ``$ref`` treats as a schema) are compiled when first met, and fail that check alone."""
    found: dict[str, Regex] = {}
    stack = [schema]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        pattern = item.get("pattern")
        properties = item.get("patternProperties")
        for each in ([pattern] if isinstance(pattern, str) else []) + (
                list(properties) if isinstance(properties, dict) else []):
            if each not in found:
                found[each] = compile_pattern(each)
        stack.extend(DRAFT202012.subresources_of(item))
    return found


# ----------------------------------------------------------------------------------------- validation cost
VALIDATION_STEPS_BASE = 100_000
VALIDATION_STEPS_PER_CHAR = 2
"""The step budget of one check of a tool's arguments: ``VALIDATION_STEPS_BASE + VALIDATION_STEPS_PER_CHAR`` times
the length of their JSON text (``validation_steps``). A step is one keyword applied to one value, plus the work
counted below where a keyword's own work grows with its value (``ArgumentValidator.spent`` counts them). Measured
(jsonschema 4.26, one core of the shared test machine): a step costs 2 to 9 µs (a ``$ref`` the most), so the base
budget is at most about a second; legitimate arguments of about 530 to 640 KB spend 14 to 23% of their budgets
(22,000 pydantic objects reached through a ``$ref``: 242,000 of 1,156,000 steps; 6,000 rows of six fields with a
pattern, and a uniqueItems list of 20,000: 318,000 of 1,379,000). The doubling chain spends any budget within a few
levels of ``allOf`` and is refused."""

REGEX_UNITS_PER_STEP = 1_000
"""RE2's worst case is linear: text bytes times program size (a pattern whose DFA blows up runs on the NFA),
measured at up to 6.7 ns per byte and instruction; so a search costs one step per 1,000 of them (about 7 µs), and
is paid for before it runs."""

ERROR_STEPS = 10
ERROR_CHARS_PER_STEP = 100
"""A validation error costs ``ERROR_STEPS`` plus a step per 100 characters of its message (which holds the repr
of the value, up to the whole argument): what bounds the memory and time spent on errors."""

SCHEMA_KEYS_PER_STEP = 64
"""jsonschema looks at every key of a schema object each time it applies it (twice): a step per 64 keys."""

CLOCK_EVERY = 256
"""Steps between looks at the clock, for the time limit ``ArgumentValidator.errors`` may be given."""

MAX_ERRORS = 100
"""Most errors collected from one check: enough to tell the agent the few that matter."""


def validation_steps(json_chars: int) -> int:
    """The step budget for checking arguments whose JSON text is ``json_chars`` characters long."""
    return VALIDATION_STEPS_BASE + VALIDATION_STEPS_PER_CHAR * json_chars


class TooCostly(Exception):
    """Checking the arguments spent its budget of ``steps`` (or its time limit) and was stopped."""

    def __init__(self, steps: int) -> None:
        super().__init__(f"checking the arguments would cost more than {steps} steps")
        self.steps = steps


Keyword = Callable[[Any, Any, Any, Any], Iterator[ValidationError]]
_CHARGED = "_hotmesh_charged"  # set on an error once its cost is counted (it passes every enclosing keyword)


class _Run:
    """One check's budget and the validator it runs for; the keywords find it in ``_RUN``."""

    __slots__ = ("deadline", "left", "next_clock", "steps", "validator")

    def __init__(self, validator: ArgumentValidator, steps: int, seconds: float | None) -> None:
        self.validator = validator
        self.steps = self.left = steps
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.next_clock = max(steps - CLOCK_EVERY, 0)

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < self.next_clock:
            self.look()

    def look(self) -> None:
        """Stops the check when its steps are spent or its time is up (the clock is read every CLOCK_EVERY)."""
        if self.left < 0 or (self.deadline is not None and time.monotonic() > self.deadline):
            raise TooCostly(self.steps)
        self.next_clock = max(self.left - CLOCK_EVERY, 0)

    def charge(self, error: ValidationError) -> ValidationError:
        """Counts what an error cost to make, once (it passes every keyword that encloses the one that made it)."""
        if _CHARGED not in error.__dict__:
            error.__dict__[_CHARGED] = True
            self.spend(ERROR_STEPS + len(error.message) // ERROR_CHARS_PER_STEP)
        return error

    def matches(self, pattern: str, text: str) -> bool:
        regex = self.validator.regex(pattern)
        data = text.encode()
        self.spend(1 + len(data) * regex.size // REGEX_UNITS_PER_STEP)
        return regex.search(data)

    def additional(self, instance: dict[str, Any], schema: dict[str, Any]) -> list[str]:
        """The properties of ``instance`` neither ``properties`` nor ``patternProperties`` of ``schema`` name."""
        properties = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        self.spend(len(instance))
        return [k for k in instance if k not in properties and not any(self.matches(p, k) for p in patterns)]

    def unique(self, items: list[Any]) -> bool:
        """Whether no two of ``items`` are equal as JSON (1 and 1.0 are, 1 and true are not): linear, where
        jsonschema compares every pair of unsortable items (an hour for 100,000 small objects)."""
        seen: set[Any] = set()
        for item in items:
            key = self.canonical(item)
            if key in seen:
                return False
            seen.add(key)
        return True

    def canonical(self, value: Any) -> Any:
        """A hashable value equal to another's exactly when the two are equal as JSON."""
        if value is True or value is False:
            return ("b", value)
        if isinstance(value, list):
            self.spend(1 + len(value) // 8)
            return ("a", tuple(self.canonical(v) for v in value))
        if isinstance(value, dict):
            self.spend(1 + len(value) // 8)
            return ("o", frozenset((k, self.canonical(v)) for k, v in value.items()))
        return value  # a string, a number (1 == 1.0, with equal hashes) or None


_RUN: ContextVar[_Run | None] = ContextVar("hotmesh_validation_run", default=None)


def _run() -> _Run:
    run = _RUN.get()
    if run is None:
        raise RuntimeError("an ArgumentValidator's keywords run only inside ArgumentValidator.errors")
    return run


def _length(value: object) -> int:
    return len(value) if isinstance(value, (list, dict)) else 0


# Keywords whose own work grows with the schema's value or with the instance: what they cost beyond their step.
# (Every subschema a keyword applies is counted when it is applied.)
_EXTRA: dict[str, Callable[[_Run, Any, Any], int]] = {
    **dict.fromkeys(("properties", "required", "allOf", "anyOf", "oneOf", "prefixItems", "dependentSchemas",
                     "type"), lambda _run, value, _instance: _length(value)),
    **dict.fromkeys(("items", "contains", "propertyNames", "uniqueItems"),
                    lambda _run, _value, instance: _length(instance)),
    **dict.fromkeys(("const", "enum", "dependentRequired"), lambda run, value, _instance: run.validator.size(value)),
}


def _counted(keyword: str, function: Keyword) -> Keyword:
    extra = _EXTRA.get(keyword)

    def counted(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        run = _RUN.get()
        if run is None:
            raise RuntimeError("an ArgumentValidator's keywords run only inside ArgumentValidator.errors")
        run.left -= 1 if extra is None else 1 + extra(run, value, instance)  # run.spend(), inline: the hot path
        if run.left < run.next_clock:
            run.look()
        # map(), not a generator: no frame of ours between a keyword and the subschemas it applies, so a reference
        # loop meets Python's recursion limit no sooner than with jsonschema alone
        return map(run.charge, function(validator, value, instance, schema) or ())

    counted.__name__ = counted.__qualname__ = f"counted_{keyword}"
    return counted


def _applicable(schema: Any) -> Iterable[tuple[str, Any]]:
    """The keywords of a schema object, as jsonschema's default, counting its size when it is large."""
    if len(schema) >= SCHEMA_KEYS_PER_STEP:
        run = _RUN.get()
        if run is not None:  # None: the validator being built, outside any check
            run.spend(len(schema) // SCHEMA_KEYS_PER_STEP)
    items: Iterable[tuple[str, Any]] = schema.items()
    return items


def _extras(extras: list[Any]) -> tuple[str, str]:
    return ", ".join(repr(extra) for extra in extras), "was" if len(extras) == 1 else "were"


# jsonschema's keywords that match patterns or compare values, on RE2 and counted (the rest are its own, counted).
def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _run().matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    run = _run()
    run.spend(len(patterns) * len(instance))
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if run.matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _run().additional(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            patterns = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {patterns}")
        else:
            error = "Additional properties are not allowed ({} {} unexpected)"
            yield ValidationError(error.format(*_extras(sorted(extras, key=str))))


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if unique and validator.is_type(instance, "array") and not _run().unique(instance):
        yield ValidationError(f"{instance!r} has non-unique elements")


def _unevaluated_items(validator: Any, unevaluated: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "array"):
        return
    evaluated = _evaluated_items(validator, instance, schema, _run())
    extras = [item for index, item in enumerate(instance) if index not in evaluated]
    if extras:
        yield ValidationError("Unevaluated items are not allowed ({} {} unexpected)".format(*_extras(extras)))


def _unevaluated_properties(validator: Any, unevaluated: Any, instance: Any, schema: Any,
                            ) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    run = _run()
    evaluated = _evaluated_properties(validator, instance, schema, run)
    run.spend(len(instance))
    extras = [key for key in instance if key not in evaluated and next(
        validator.descend(instance[key], unevaluated, path=key, schema_path=key), None) is not None]
    if extras:
        if unevaluated is False:
            error = "Unevaluated properties are not allowed ({} {} unexpected)"
            yield ValidationError(error.format(*_extras(sorted(extras, key=str))))
        else:
            error = "Unevaluated properties are not valid under the given schema ({} {} unevaluated and invalid)"
            yield ValidationError(error.format(*_extras(extras)))


# jsonschema's walks for unevaluatedItems and unevaluatedProperties (jsonschema._utils, MIT), counted: they follow
# $ref, if/then/else and dependentSchemas without applying any keyword, so a chain of references that doubles at
# each level would cost nothing otherwise. Sets instead of lists: jsonschema's ``index not in list`` is quadratic.
def _conditional_branches(validator: Any, instance: Any, schema: dict[str, Any]) -> list[Any]:
    """The subschemas of ``if``/``then``/``else`` that apply to ``instance``: ``if`` and ``then`` when it holds,
    ``else`` when it does not."""
    if "if" not in schema:
        return []
    if validator.evolve(schema=schema["if"]).is_valid(instance):
        return [schema["if"]] + ([schema["then"]] if "then" in schema else [])
    return [schema["else"]] if "else" in schema else []


def _evaluated_items(validator: Any, instance: list[Any], schema: Any, run: _Run) -> set[int]:
    run.spend(1)
    if validator.is_type(schema, "boolean"):
        return set()
    if "items" in schema:
        run.spend(len(instance))
        return set(range(len(instance)))
    evaluated: set[int] = set()
    for keyword in ("$ref", "$dynamicRef"):
        reference = schema.get(keyword)
        if reference is not None:
            resolved = validator._resolver.lookup(reference)
            evaluated |= _evaluated_items(validator.evolve(schema=resolved.contents, _resolver=resolved.resolver),
                                          instance, resolved.contents, run)
    if "prefixItems" in schema:
        evaluated.update(range(min(len(schema["prefixItems"]), len(instance))))
    for branch in _conditional_branches(validator, instance, schema):
        evaluated |= _evaluated_items(validator, instance, branch, run)
    for keyword in ("contains", "unevaluatedItems"):
        if keyword in schema:
            run.spend(len(instance))
            applied = validator.evolve(schema=schema[keyword])
            evaluated.update(index for index, item in enumerate(instance) if applied.is_valid(item))
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, ()):
            if next(validator.descend(instance, subschema), None) is None:
                evaluated |= _evaluated_items(validator, instance, subschema, run)
    return evaluated


def _evaluated_properties(validator: Any, instance: dict[str, Any], schema: Any, run: _Run) -> set[str]:
    run.spend(1)
    if validator.is_type(schema, "boolean"):
        return set()
    evaluated: set[str] = set()
    for keyword in ("$ref", "$dynamicRef"):
        reference = schema.get(keyword)
        if reference is not None:
            resolved = validator._resolver.lookup(reference)
            evaluated |= _evaluated_properties(
                validator.evolve(schema=resolved.contents, _resolver=resolved.resolver), instance, resolved.contents,
                run)
    properties = schema.get("properties")
    if validator.is_type(properties, "object"):
        run.spend(1 + len(properties) // SCHEMA_KEYS_PER_STEP)
        evaluated |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (subschema := schema.get(keyword)) is not None:
            run.spend(len(instance))
            evaluated.update(key for key, value in instance.items()
                             if next(validator.descend(value, subschema), None) is None)
    if "patternProperties" in schema:
        run.spend(len(instance) * len(schema["patternProperties"]))
        evaluated.update(key for key in instance
                         if any(run.matches(pattern, key) for pattern in schema["patternProperties"]))
    if "dependentSchemas" in schema:
        for key, subschema in schema["dependentSchemas"].items():
            run.spend(1)
            if key in instance:
                evaluated |= _evaluated_properties(validator, instance, subschema, run)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, ()):
            if next(validator.descend(instance, subschema), None) is None:
                evaluated |= _evaluated_properties(validator, instance, subschema, run)
    for branch in _conditional_branches(validator, instance, schema):
        evaluated |= _evaluated_properties(validator, instance, branch, run)
    return evaluated


_KEYWORDS: dict[str, Keyword] = {
    **Draft202012Validator.VALIDATORS,
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
    "unevaluatedItems": _unevaluated_items,
    "unevaluatedProperties": _unevaluated_properties,
}
# Draft 2020-12 with every keyword counted (``format`` asserts nothing: no format checker is given).
_Counted = validators.create(
    meta_schema=Draft202012Validator.META_SCHEMA,
    validators={keyword: _counted(keyword, function) for keyword, function in _KEYWORDS.items()},
    type_checker=Draft202012Validator.TYPE_CHECKER,
    format_checker=Draft202012Validator.FORMAT_CHECKER,
    id_of=Draft202012Validator.ID_OF,  # type: ignore[arg-type]  # the stub wants str, the function gives str | None
    applicable_validators=_applicable,
)


class ArgumentValidator:
    """Checks a tool's arguments against its input schema at a bounded cost (see ``errors``). Thread-safe: each
    check's budget lives in a context variable, and the caches only ever gain entries."""

    def __init__(self, schema: Any, patterns: dict[str, Regex]) -> None:
        self.schema = schema
        self._validator: Validator = _Counted(schema, registry=NO_RETRIEVAL)
        self._patterns = patterns  # pattern -> RE2; patterns met outside the subschemas are added when first met
        self._sizes: dict[int, int] = {}  # id() of a value of the schema -> its cost to compare with

    def errors(self, instance: Any, steps: int, *, seconds: float | None = None,
               limit: int = MAX_ERRORS) -> list[ValidationError]:
        """Up to ``limit`` of the ways ``instance`` violates the schema; raises ``TooCostly`` when finding them
        takes more than ``steps`` steps or, if given, ``seconds``. Other exceptions: the schema cannot be applied
        (a reference it cannot resolve or that loops, a pattern RE2 cannot compile)."""
        return self._check(instance, _Run(self, steps, seconds), limit)

    def spent(self, instance: Any, limit: int = MAX_ERRORS) -> int:
        """How many steps checking ``instance`` takes (for measurements and tests; no budget)."""
        run = _Run(self, 1 << 62, None)
        self._check(instance, run, limit)
        return run.steps - run.left

    def _check(self, instance: Any, run: _Run, limit: int) -> list[ValidationError]:
        token = _RUN.set(run)
        try:
            return list(itertools.islice(self._validator.iter_errors(instance), limit))
        except Exception:
            raise
        except BaseException as exc:  # rpds (under referencing) panics, a BaseException, if it meets the
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # recursion limit of a reference loop
                raise
            raise RuntimeError(f"the schema could not be applied ({type(exc).__name__})") from exc
        finally:
            _RUN.reset(token)

    def regex(self, pattern: str) -> Regex:
        found = self._patterns.get(pattern)
        if found is None:
            found = self._patterns[pattern] = compile_pattern(pattern)
        return found

    def size(self, value: Any) -> int:
        """What comparing with ``value`` (a ``const``, an ``enum``) may cost: its values, and a step per 1,000
        characters of its strings. Values of the schema live as long as it does, so their ids are stable."""
        if not isinstance(value, (list, dict)):
            return len(value) // 1000 if isinstance(value, str) else 0
        found = self._sizes.get(id(value))
        if found is None:
            found = 0
            stack: list[Any] = [value]
            while stack:
                item = stack.pop()
                found += 1
                if isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
                elif isinstance(item, str):
                    found += len(item) // 1000
            self._sizes[id(value)] = found
        return found
