"""JSON Schema validation of a parsed spec, as located, readable problems.

Every error is collected (`iter_errors`, not `validate`), turned into one `Problem` at the most
useful place (an unknown key points at the key, a missing key at its mapping), and rephrased
where jsonschema's wording is puzzling (a YAML 1.1 `no` where a string is expected).
"""

from __future__ import annotations

import datetime
import difflib
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from .problems import JsonPath, Problem, short_repr
from .schema import load_schema
from .yaml_source import SourceDocument

_JSON_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}

# Patterns whose regex says little to a reader.
_PATTERN_HINTS = {
    "^[a-z0-9][a-z0-9-]{0,62}$": "lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters",
    "^[A-Za-z0-9_-]+$": "letters, digits, '_' and '-' only",
    "^[^\\s/]+$": "a host name or IP address without spaces or '/'",
    "^[A-Za-z0-9._:\\[\\]-]+$": "a host name or IP address: letters, digits, '.', '-', '_', ':', '[' and ']' only",
    # Paths reach systemd units (where % and $ expand), commands, chowns and Ansible templates.
    "^(?!.*(^|/)\\.\\.(/|$))[^\\s\\x00-\\x1f\\x7f%$\\\\\"';{}]+$": (
        "a path without whitespace, control characters, '..' segments or any of % $ \\ \" ' ; { }"
    ),
    "^(nats|tls|ws|wss)://[^\\s/]+(:[0-9]{1,5})?/?$": "a nats://, tls://, ws:// or wss:// URL: scheme://host[:port]",
}


def _validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema())


def json_type_name(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _yaml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return short_repr(value)


def _describe_value(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return f"{json_type_name(value)} {short_repr(value)}"


def _expected_types(error: ValidationError) -> list[str]:
    expected = error.validator_value
    return [expected] if isinstance(expected, str) else list(expected)


def _type_message(error: ValidationError, document: SourceDocument, path: JsonPath) -> str:
    expected = _expected_types(error)
    plain = document.plain_scalars.get(path)
    if plain is not None and "string" in expected:
        if plain.text == "" or plain.value is None and plain.text in ("~", "null", "Null", "NULL"):
            return f"empty value (read as null); expected {' or '.join(expected)}"
        return (
            f"ambiguous YAML 1.1 value {plain.text!r} (read as {json_type_name(plain.value)} "
            f"{_yaml_repr(plain.value)}) — quote it: \"{plain.text}\""
        )
    return f"expected {' or '.join(expected)}, got {_describe_value(error.instance)}"


def _unknown_property_problems(error: ValidationError, document: SourceDocument, path: JsonPath) -> list[Problem]:
    known = list(error.schema.get("properties", {}))
    problems = []
    for key in error.instance:
        if key in known:
            continue
        message = f"unknown property {short_repr(key)}"
        close = difflib.get_close_matches(str(key), known, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        elif known:
            message += f"; allowed: {', '.join(known)}"
        problems.append(document.problem(path + (key,), message, at_key=True))
    return problems


def _message(error: ValidationError, document: SourceDocument, path: JsonPath) -> str:
    kind = error.validator
    if kind == "type":
        return _type_message(error, document, path)
    if kind == "const":
        return f"must be {error.validator_value!r}, got {_describe_value(error.instance)}"
    if kind == "enum":
        choices = ", ".join(repr(choice) for choice in error.validator_value)
        return f"must be one of {choices}; got {_describe_value(error.instance)}"
    if kind == "pattern":
        hint = _PATTERN_HINTS.get(error.validator_value, f"must match {error.validator_value}")
        return f"{short_repr(error.instance)} is not valid: {hint}"
    if kind == "minItems":
        count = error.validator_value
        return f"needs at least {count} item{'s' if count != 1 else ''}"
    if kind == "uniqueItems":
        return "items must be unique"
    if kind in ("anyOf", "oneOf") and error.context:
        return _message(best_match(error.context), document, path)
    return str(error.message)  # jsonschema ships no types: its message is a str


def schema_problems(document: SourceDocument) -> list[Problem]:
    """Every schema violation in the document, at most one per path and kind."""
    errors = list(_validator().iter_errors(document.data))
    # A wrong type makes the value's other checks (enum, pattern, ...) noise.
    type_error_paths = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    problems: list[Problem] = []
    for error in errors:
        path = tuple(error.absolute_path)
        if path in document.flagged_paths:
            continue  # already reported while parsing (duplicate key, ambiguous number)
        if error.validator == "additionalProperties":
            problems.extend(_unknown_property_problems(error, document, path))
            continue
        if path in type_error_paths and error.validator != "type":
            continue
        if error.validator == "required":
            missing = [key for key in error.validator_value if key not in error.instance]
            problems.extend(document.problem(path, f"missing required property {key!r}") for key in missing)
            continue
        problems.append(document.problem(path, _message(error, document, path)))
    return list(dict.fromkeys(problems))  # drop exact duplicates, keep order
