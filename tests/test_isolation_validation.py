"""What checking arguments against a registered input schema may cost (issue #9), without a database.

A worker role writes the schema, so every way it can make a check cost without end is refused or bounded here:
work that doubles through ``$ref``s (through keywords, and through the walks of ``unevaluatedProperties`` and
``unevaluatedItems``, which apply none), patterns that backtrack, ``uniqueItems`` over unsortable items, and a
keyword's own work on a large schema value or instance. Each check stays within its step budget
(``schemas.validation_steps``), and legitimate arguments well within theirs, with jsonschema's verdicts.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import re2  # type: ignore[import-untyped]

from mcp_hotmesh import _schemas as schemas
from mcp_hotmesh._caller import describe_errors


def validator(schema: dict[str, Any]) -> schemas.ArgumentValidator:
    assert schemas.bounds("t", "", schema, None) is None  # within every registration limit
    checked = schemas.check("key", None, schema, None)
    assert checked.problem is None and checked.validator is not None, checked.problem
    return checked.validator


def budget(arguments: Any) -> int:
    return schemas.validation_steps(len(json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)))


def messages(schema: dict[str, Any], arguments: Any) -> list[str]:
    return [e.message for e in validator(schema).errors(arguments, budget(arguments))]


def chain(depth: int, leaf: dict[str, Any], link: str = "allOf") -> dict[str, Any]:
    """``$defs`` entries that apply the next one twice: 2 ** depth applications of ``leaf``."""
    defs: dict[str, Any] = {f"d{i}": {link: [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
                            for i in range(depth)}
    defs[f"d{depth}"] = leaf
    return {"type": "object", "$defs": defs, "properties": {"x": {"$ref": "#/$defs/d0"}}}


def unevaluated_chain(depth: int) -> dict[str, Any]:
    """The same doubling through if/then and dependentSchemas, which the walk of unevaluatedProperties follows
    without applying a keyword (jsonschema alone: 4.7 s at 16 levels)."""
    defs: dict[str, Any] = {f"d{i}": {"if": {}, "then": {"$ref": f"#/$defs/d{i + 1}"},
                                      "dependentSchemas": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(depth)}
    defs[f"d{depth}"] = {}
    return {"type": "object", "$defs": defs, "$ref": "#/$defs/d0", "unevaluatedProperties": False}


def unevaluated_items_chain(depth: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"if": {}, "then": {"$ref": f"#/$defs/d{i + 1}"},
                                      "else": {"$ref": f"#/$defs/d{i + 1}"},
                                      "allOf": [{"$ref": f"#/$defs/d{i + 1}"}]} for i in range(depth)}
    defs[f"d{depth}"] = {}
    return {"type": "object", "$defs": defs,
            "properties": {"x": {"$ref": "#/$defs/d0", "unevaluatedItems": False}}}


COSTLY: dict[str, tuple[dict[str, Any], Any]] = {
    "allOf doubling": (chain(25, {"type": "integer"}), {"x": 1}),
    "anyOf doubling, every branch failing": (chain(25, {"type": "string"}, "anyOf"), {"x": 1}),
    "anchors": ({"type": "object", "$defs": {f"d{i}": {"$anchor": f"a{i}", "allOf": [
        {"$ref": f"#a{i + 1}"}, {"$ref": f"#a{i + 1}"}]} for i in range(25)} | {"d25": {"$anchor": "a25"}},
        "properties": {"x": {"$ref": "#a0"}}}, {"x": 1}),
    "dynamic references": ({"type": "object", "$defs": {f"d{i}": {"$dynamicAnchor": f"m{i}", "allOf": [
        {"$dynamicRef": f"#m{i + 1}"}, {"$dynamicRef": f"#m{i + 1}"}]} for i in range(25)} | {
        "d25": {"$dynamicAnchor": "m25"}}, "properties": {"x": {"$dynamicRef": "#m0"}}}, {"x": 1}),
    "unevaluatedProperties walk": (unevaluated_chain(25), {"a": 1}),
    "unevaluatedItems walk": (unevaluated_items_chain(25), {"x": [1]}),
    "enum of 5,000 at every leaf": (chain(20, {"enum": list(range(5000))}), {"x": -1}),
    "9,000 keywords nobody knows at every leaf": (chain(20, {f"k{i}": 0 for i in range(9000)}), {"x": 1}),
    "items: true over 20,000 items at every leaf": (chain(20, {"items": True}), {"x": list(range(20_000))}),
    # errors made and dropped (under not): each message holds the 200 KB value
    "a failing pattern on 200 KB at every leaf": (chain(20, {"not": {"pattern": "^b"}}), {"x": "a" * 200_000}),
    "an error naming 200 KB at every leaf": (chain(20, {"not": {"type": "string"}}), {"x": list(range(40_000))}),
}


@pytest.mark.parametrize("name", list(COSTLY))
def test_work_that_grows_without_end_is_refused_within_its_budget(name: str) -> None:
    schema, arguments = COSTLY[name]
    steps = budget(arguments)
    started = time.monotonic()
    with pytest.raises(schemas.TooCostly) as refused:
        validator(schema).errors(arguments, steps)
    assert refused.value.steps == steps
    assert time.monotonic() - started < 15  # a budget of about a million steps at most here: seconds, not hours


@pytest.mark.parametrize(("schema", "arguments", "expected"), [
    ({"type": "object", "properties": {"s": {"pattern": "^(a+)+$"}}}, {"s": "a" * 100_000 + "b"},
     ["does not match '^(a+)+$'"]),
    ({"type": "object", "properties": {"s": {"pattern": "^(a+)+$"}}}, {"s": "a" * 100_000}, []),
    ({"type": "object", "patternProperties": {"^(a|aa)+$": {"type": "integer"}}},
     {"a" * 10_000 + "b": "x", "aaaa": "y"}, ["'y' is not of type 'integer'"]),
    ({"type": "object", "patternProperties": {"^(a|aa)+$": {}}, "additionalProperties": False},
     {"a" * 10_000 + "b": 1, "aa": 2}, ["does not match any of the regexes: '^(a|aa)+$'"]),
    ({"type": "object", "properties": {"a": {"uniqueItems": True}}}, {"a": [{"k": i} for i in range(100_000)]}, []),
    ({"type": "object", "unevaluatedProperties": False, "patternProperties": {"^(a+)+$": {}}},
     {"a" * 10_000 + "b": 1}, ["Unevaluated properties are not allowed"]),
])
def test_what_was_exponential_or_quadratic_is_linear_with_the_same_verdict(
        schema: dict[str, Any], arguments: Any, expected: list[str]) -> None:
    started = time.monotonic()
    found = messages(schema, arguments)
    assert time.monotonic() - started < 5
    assert len(found) == len(expected), found
    for message, words in zip(found, expected, strict=True):
        assert words in message, message


@pytest.mark.parametrize(("items", "unique"), [
    ([1, 1.0], False), ([1, True], True), ([0, False], True), ([[1], [True]], True), ([{"a": 1}, {"a": 1.0}], False),
    ([{"a": [1, {"b": None}]}, {"a": [1, {"b": None}]}], False), ([{"a": 1, "b": 2}, {"b": 2, "a": 1}], False),
    ([[1, 2], [2, 1]], True), (["1", 1], True), ([None, None], False), ([{}, []], True), ([], True),
])
def test_unique_items_keeps_json_equality(items: list[Any], unique: bool) -> None:
    schema = {"type": "object", "properties": {"a": {"uniqueItems": True}}}
    assert (messages(schema, {"a": items}) == []) is unique


def test_legitimate_large_arguments_spend_a_fraction_of_their_budget() -> None:
    """A pydantic list of objects reached through a $ref, and 40,000 strings with a pattern: about 528 and 540 KB,
    which spend about 21% and 14% of their budgets."""
    shape = {"type": "object", "required": ["points"], "$defs": {"Point": {
        "type": "object", "required": ["x", "y"], "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}},
        "properties": {"name": {"type": "string"}, "points": {"type": "array", "items": {"$ref": "#/$defs/Point"}}}}
    points = {"name": "tri", "points": [{"x": 100_000 + i, "y": 100_000 + i} for i in range(22_000)]}
    tags = {"type": "object", "properties": {"tags": {"type": "array", "items": {"pattern": "^[a-z]+$"}}}}
    words = {"tags": ["t" + "x" * (i % 20) for i in range(40_000)]}
    for schema, arguments in ((shape, points), (tags, words)):
        check = validator(schema)
        assert check.spent(arguments) < budget(arguments) / 3
        assert check.errors(arguments, budget(arguments)) == []


def test_errors_are_counted_and_collected_up_to_a_limit() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}}
    found = validator(schema).errors({"a": list(range(10_000))}, budget({"a": list(range(10_000))}))
    assert len(found) == schemas.MAX_ERRORS
    assert found[0].message == "0 is not of type 'string'"
    assert describe_errors(found).endswith("a/4: 4 is not of type 'string' (and at least 95 more)")


def test_a_reference_loop_is_an_ordinary_exception() -> None:
    with pytest.raises(RecursionError):
        validator({"type": "object", "$ref": "#"}).errors({"a": 1}, 100_000)


def test_the_clock_stops_a_check_too() -> None:
    with pytest.raises(schemas.TooCostly):
        validator(chain(25, {"type": "integer"})).errors({"x": 1}, 10**9, seconds=0.05)


def test_keywords_run_only_within_a_budget() -> None:
    check = validator({"type": "object"})
    with pytest.raises(RuntimeError, match="only inside"):
        list(check._validator.iter_errors({}))


# ------------------------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize(("pattern", "expected"), [
    ("^[A-Z]{3}-\\d+$", "^[A-Z]{3}-\\d+$"),
    ("\\u00e9\\u0041", "\\x{E9}\\x{41}"),
    ("\\uD83D\\uDE00", "\\x{1F600}"),  # a surrogate pair is one code point
    ("\\\\u0041", "\\\\u0041"),  # an escaped backslash, then a literal u0041
    ("a\\Z", "a\\z"),
    ("[\\b]\\b", "[\\x08]\\b"),  # a backspace in a class, a word boundary outside
    ("[]\\b]\\b", "[]\\x08]\\b"),  # ] first in a class is a literal
    ("[^]\\b]", "[^]\\x08]"),
])
def test_for_re2_translates_what_re2_spells_otherwise(pattern: str, expected: str) -> None:
    assert schemas.for_re2(pattern) == expected


@pytest.mark.parametrize(("pattern", "text", "found"), [
    ("^[A-Z]{3}-\\d+$", "ABC-123", True), ("^[A-Z]{3}-\\d+$", "ABC-123\n", False),  # ECMA's $
    ("^\\u00e9+$", "ééé", True), ("\\uD83D\\uDE00", "a😀", True), ("^[\\u0041-\\u005A]+$", "AZ", True),
    ("colou?r", "the color", True), ("^$", "", True), ("\\d", "٣", False),  # ECMA's \d is ASCII
])
def test_patterns_match_on_re2_as_json_schema_says(pattern: str, text: str, found: bool) -> None:
    regex = schemas.compile_pattern(pattern)
    assert regex.search(text.encode()) is found
    fallback = re2.compile(schemas.for_re2(pattern), schemas._RE2_OPTIONS)
    assert (fallback.search(text.encode()) is not None) is found  # RE2's public search agrees with the fast path


@pytest.mark.parametrize("pattern", ["^(?=a)", "(?!a)b", "(?<=a)b", "(a)\\1", "(?P<x>a)(?P=x)", "a{1001}"])
def test_patterns_re2_cannot_run_make_the_tool_unusable(pattern: str) -> None:
    for schema in ({"type": "object", "properties": {"s": {"pattern": pattern}}},
                   {"type": "object", "patternProperties": {pattern: {}}}):
        checked = schemas.check("key", None, schema, None)
        assert checked.validator is None and checked.problem is not None
        assert "has a pattern this server cannot apply in bounded time" in checked.problem, checked.problem


def test_a_pattern_outside_the_subschemas_fails_only_when_applied() -> None:
    """A ``$ref`` can treat any object of the schema as a schema: its patterns are compiled when met."""
    schema = {"type": "object", "default": {"pattern": "(?=x)"}, "properties": {
        "a": {"$ref": "#/default"}, "b": {"type": "string"}}}
    check = validator(schema)
    assert check.errors({"b": "fine"}, 100_000) == []
    with pytest.raises(schemas.UnusablePattern):
        check.errors({"a": "x"}, 100_000)


def test_output_schemas_reach_hosts_checkable_in_bounded_time() -> None:
    """A host checks every structured result against the output schema with its own validator (the MCP Python
    client: jsonschema and Python's re, on its event loop). What it gets has no costly keyword and no reference."""
    from mcp_hotmesh._schemas import for_hosts

    costly = {
        "type": "object",
        "$defs": {"Item": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a+)+$"}},
                           "additionalProperties": False}},
        "properties": {"items": {"type": "array", "uniqueItems": True, "items": {"$ref": "#/$defs/Item"}},
                       "tags": {"type": "object", "patternProperties": {"^x-": {"type": "string"}},
                                "additionalProperties": False}},
        "unevaluatedProperties": False,
    }
    listed = for_hosts(costly)
    assert listed is not None
    text = json.dumps(listed)
    for keyword in ("pattern", "uniqueItems", "unevaluated", "$ref", "$defs"):
        assert keyword not in text, keyword
    # it accepts what the original accepted (and more): the item's own shape is kept
    assert listed["properties"]["items"]["items"]["properties"]["code"] == {"type": "string"}
    assert listed["properties"]["items"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in listed["properties"]["tags"]  # it would refuse what the patterns allowed
    assert for_hosts({"type": "object", "properties": {"self": {"$ref": "#"}}}) is None  # a cycle: no schema
    chain: dict[str, Any] = {"type": "object", "$defs": {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"},
                                                                         {"$ref": f"#/$defs/d{i + 1}"}]}
                                                         for i in range(30)}}
    chain["$defs"]["d30"] = {"type": "string"}
    chain["properties"] = {"x": {"$ref": "#/$defs/d0"}}
    assert for_hosts(chain) is None  # doubling when inlined: over the budget, so no schema rather than a huge one
