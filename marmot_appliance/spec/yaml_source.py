"""YAML to plain data, remembering where every key and value came from.

PyYAML's composer gives a node tree with source marks; we build the Python data from it
ourselves instead of using `safe_load`, so that we can:

* reject duplicate keys (PyYAML silently keeps the last one), located at the second key;
* remember the original text of plain scalars that YAML 1.1 resolved to something other than a
  string (`no` -> False, `0640` -> 416, `1:30` -> 90), so validation can say "quote it" instead
  of a puzzling type error;
* bound the size of documents built from aliases ("billion laughs") and nesting depth.

Fatal problems (syntax errors, no document) raise `SpecError`; the rest are collected in
`SourceDocument.problems` and reported together with schema and semantic problems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from marmot_appliance.errors import SpecError

from .problems import JsonPath, Mark, Problem, short_repr

MAX_VALUES = 100_000  # more values than any sane spec; stops alias bombs
MAX_DEPTH = 64

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Numbers YAML 1.1 reads differently from YAML 1.2 (and from what people expect).
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")
_BINARY = re.compile(r"^[-+]?0b[0-1_]+$")


@dataclass(frozen=True)
class PlainScalar:
    """A plain (unquoted) scalar that resolved to a non-string value."""

    text: str
    value: Any


@dataclass
class SourceDocument:
    source: str
    data: Any
    value_marks: dict[JsonPath, Mark] = field(default_factory=dict)
    key_marks: dict[JsonPath, Mark] = field(default_factory=dict)
    plain_scalars: dict[JsonPath, PlainScalar] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    flagged_paths: set[JsonPath] = field(default_factory=set)  # already have a parse problem

    def locate(self, path: JsonPath) -> Mark | None:
        """Mark of the value at `path`, or of its nearest ancestor that exists."""
        path = tuple(path)
        while True:
            if path in self.value_marks:
                return self.value_marks[path]
            if not path:
                return None
            path = path[:-1]

    def locate_key(self, path: JsonPath) -> Mark | None:
        """Mark of the key naming `path` (better for 'unknown property'), else of its value."""
        return self.key_marks.get(tuple(path)) or self.locate(path)

    def problem(self, path: JsonPath, message: str, *, at_key: bool = False) -> Problem:
        mark = self.locate_key(path) if at_key else self.locate(path)
        return Problem(self.source, mark, tuple(path), message)


def _mark(node: Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _fatal(source: str, mark: Mark | None, message: str) -> SpecError:
    return SpecError([Problem(source, mark, None, message).format()])


def _line_column(text: str, position: int) -> Mark:
    before = text[:position]
    line = before.count("\n") + 1
    return Mark(line, position - (before.rfind("\n") + 1) + 1)


def _compose(text: str, source: str) -> Node | None:
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader checks for unprintable characters right here
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Mark(mark.line + 1, mark.column + 1) if mark else None
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        if "'\\t'" in message:
            message += " (indent with spaces; YAML does not allow tabs there)"
        raise _fatal(source, where, f"invalid YAML: {message}") from None
    except yaml.reader.ReaderError as exc:
        where = _line_column(text, exc.position)
        character = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        raise _fatal(source, where, f"invalid YAML: unacceptable character #x{character:04x}") from None
    except yaml.YAMLError as exc:
        raise _fatal(source, None, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _fatal(source, None, "invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


class _Builder:
    def __init__(self, document: SourceDocument):
        self.document = document
        self.constructor = SafeConstructor()
        self.values = 0
        self.active: set[int] = set()  # nodes being built: an alias back into one is a cycle

    def build(self, node: Node, path: JsonPath, depth: int = 0) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _fatal(self.document.source, _mark(node), f"document too large (more than {MAX_VALUES} values)")
        if depth > MAX_DEPTH or id(node) in self.active:
            self._flag(path, node, "nested too deeply (or a recursive alias)")
            return None
        self.document.value_marks[path] = _mark(node)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path, depth)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path, depth)
        finally:
            self.active.discard(id(node))
        self._flag(path, node, "unsupported YAML node")
        return None

    def _flag(self, path: JsonPath, node: Node, message: str) -> None:
        self.document.flagged_paths.add(path)
        self.document.problems.append(Problem(self.document.source, _mark(node), path, message))

    def _scalar(self, node: ScalarNode, path: JsonPath) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            # e.g. `2001-13-45` matches YAML's timestamp pattern but is no date.
            reason = getattr(exc, "problem", None) or str(exc)
            self._flag(path, node, f"cannot read value {short_repr(node.value)}: {reason}")
            return None
        if node.style is None and not isinstance(value, str):
            self.document.plain_scalars[path] = PlainScalar(node.value, value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._check_yaml11_number(node, path, value)
        return value

    def _check_yaml11_number(self, node: ScalarNode, path: JsonPath, value: int | float) -> None:
        text = node.value
        if ":" in text:
            kind = "base-60 number"
        elif _OCTAL.match(text):
            kind = "octal number"
        elif _BINARY.match(text):
            kind = "binary number"
        else:
            return
        if kind == "octal number":
            # Most often a decimal number with a leading zero (a port, a count): say how to
            # write that. Quoting only helps where the field takes a string.
            decimal = text.lstrip("+-").lstrip("0") or "0"
            advice = (f"write {decimal} for the decimal number (or {value!r} for the octal one); "
                      "quote it only where a string is expected")
        else:
            advice = f"write {value!r} if you mean that number; quote it only where a string is expected"
        self._flag(path, node, f"ambiguous YAML 1.1 value {text!r} (read as the {kind} {value!r}) — {advice}")

    def _mapping(self, node: MappingNode, path: JsonPath, depth: int) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            self._flag(path, node, f"unsupported YAML tag {node.tag!r}")
        result: dict[str, Any] = {}
        first_seen: dict[str, Mark] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self._flag(path, key_node, "mapping keys must be plain strings, not collections")
                continue
            if key_node.tag == _MERGE_TAG:
                self._flag(path, key_node, "YAML merge keys (<<) are not supported; write the keys out")
                continue
            # Keys are taken as written: `on:` is the key 'on', never True.
            key = key_node.value
            key_path = path + (key,)
            if key in first_seen:
                first = first_seen[key]
                self.document.flagged_paths.add(key_path)
                self.document.problems.append(
                    Problem(
                        self.document.source,
                        _mark(key_node),
                        key_path,
                        f"duplicate key {key!r} (first defined at line {first.line}, column {first.column})",
                    )
                )
                continue
            first_seen[key] = _mark(key_node)
            self.document.key_marks[key_path] = _mark(key_node)
            result[key] = self.build(value_node, key_path, depth + 1)
        return result

    def _sequence(self, node: SequenceNode, path: JsonPath, depth: int) -> list[Any]:
        if node.tag != _SEQ_TAG:
            self._flag(path, node, f"unsupported YAML tag {node.tag!r}")
        return [self.build(item, path + (index,), depth + 1) for index, item in enumerate(node.value)]


def parse_yaml(text: str, source: str) -> SourceDocument:
    """Parse one YAML document. Raises `SpecError` when there is no usable document."""
    root = _compose(text, source)
    if root is None:
        raise _fatal(source, None, "the file is empty; expected a cluster spec (apiVersion, kind, name, nodes)")
    document = SourceDocument(source=source, data=None)
    try:
        document.data = _Builder(document).build(root, ())
    except RecursionError:
        raise _fatal(source, None, "invalid YAML: nested too deeply") from None
    return document
