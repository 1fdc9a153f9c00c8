"""The column definitions of a CREATE TABLE statement, exactly as they were declared.

`PRAGMA table_xinfo` reports a column's type, NOT NULL, default, key position and generated-ness,
but not its COLLATE, CHECK, REFERENCES or UNIQUE. To add a declared column with all of it, the
column's own text is cut out of the table's CREATE statement as SQLite stores it
(`sqlite_schema.sql`, kept as written and already accepted by SQLite's parser, so the text is
well-formed). The cutting is done on tokens, never with a regular expression over the whole
statement: a comma or parenthesis inside a string ('a,b'), a quoted name ("a,(b", `a,b`, [a,b]),
a comment or a nested expression (CHECK ((a) > (b))) does not end a definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sqltokens import SqlTextError, Token, tokenize, unquote


class DeclarationError(SqlTextError):
    """A CREATE TABLE text could not be cut into its column definitions."""


@dataclass(frozen=True)
class ColumnDefinition:
    name: str  # unquoted, as SQLite reports it
    definition: str  # what follows the name: type and constraints as written ("" for none)
    keywords: frozenset[str]  # its constraints by keyword: UNIQUE, REFERENCES, CHECK, NOT (NULL), ...
    default: str | None  # the DEFAULT value as written ("'x'", "-1", "(lower('A'))"), None without one


# Keywords that start a column constraint. None of them can be an unquoted name in SQLite (they
# are not in its parser's fallback-to-identifier list), so a bare one at the top level of a
# column definition is that constraint and nothing else.
CONSTRAINT_KEYWORDS = frozenset(
    ("CONSTRAINT", "PRIMARY", "NOT", "NULL", "UNIQUE", "CHECK", "DEFAULT", "COLLATE", "REFERENCES", "AS")
)
# A part of the column list that starts with one of these is a table constraint, not a column.
TABLE_CONSTRAINT_STARTS = ("CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN")


def _group_end(tokens: list[Token], index: int) -> int:
    """The index just past the parenthesis that closes the one at `index`."""
    depth = 0
    for position in range(index, len(tokens)):
        if tokens[position].is_punct("("):
            depth += 1
        elif tokens[position].is_punct(")"):
            depth -= 1
            if depth == 0:
                return position + 1
    raise DeclarationError("unbalanced parentheses")


def _top_level(tokens: list[Token]) -> list[tuple[int, Token]]:
    """(index, token) of the tokens outside any parentheses, parentheses themselves left out."""
    out = []
    index = 0
    while index < len(tokens):
        if tokens[index].is_punct("("):
            index = _group_end(tokens, index)
            continue
        out.append((index, tokens[index]))
        index += 1
    return out


def _column_list(tokens: list[Token]) -> list[list[Token]]:
    """The comma-separated parts between the parentheses that follow `CREATE TABLE name`."""
    start = next((i for i, token in enumerate(tokens) if token.is_word("TABLE")), None)
    if start is None:
        raise DeclarationError("not a CREATE TABLE statement")
    opening = next((i for i in range(start, len(tokens)) if tokens[i].is_punct("(")), None)
    if opening is None:
        raise DeclarationError("no column list")
    inner = tokens[opening + 1 : _group_end(tokens, opening) - 1]
    parts: list[list[Token]] = [[]]
    commas = {index for index, token in _top_level(inner) if token.is_punct(",")}
    for index, token in enumerate(inner):
        if index in commas:
            parts.append([])
        else:
            parts[-1].append(token)
    return [part for part in parts if part]


def _default_value(sql: str, part: list[Token], top: list[tuple[int, Token]]) -> str | None:
    """The text of the value after a DEFAULT keyword: a signed term or a parenthesized expression.
    `ON DELETE SET DEFAULT` in a REFERENCES clause is not a default."""
    for index, token in top:
        if not token.is_word("DEFAULT") or (index > 0 and part[index - 1].is_word("SET")):
            continue
        first = last = index + 1
        if first < len(part) and part[first].is_punct("+", "-"):
            last += 1
        if last >= len(part):
            raise DeclarationError("DEFAULT without a value")
        end = _group_end(part, last) if part[last].is_punct("(") else last + 1
        return sql[part[first].start : part[end - 1].end]
    return None


def _keywords(part: list[Token], top: list[tuple[int, Token]]) -> frozenset[str]:
    """The constraints a column definition has, by keyword (NOT for NOT NULL). Words of a
    REFERENCES clause (ON DELETE SET NULL / SET DEFAULT, NOT DEFERRABLE) and a DEFAULT's NULL
    value are not constraints of their own."""
    found = set()
    for index, token in top:
        if not token.is_word(*CONSTRAINT_KEYWORDS):
            continue
        before = part[index - 1] if index > 0 else None
        after = part[index + 1] if index + 1 < len(part) else None
        word = token.text.upper()
        if word in ("NULL", "DEFAULT") and before is not None and before.is_word("SET"):
            continue
        if word == "NOT" and after is not None and after.is_word("DEFERRABLE"):
            continue
        if word == "NULL" and before is not None and before.is_word("NOT", "DEFAULT"):
            continue
        found.add(word)
    return frozenset(found)


def column_definitions(create_sql: str) -> dict[str, ColumnDefinition]:
    """Lower-case column name -> its definition, for every column of a CREATE TABLE text."""
    out: dict[str, ColumnDefinition] = {}
    for part in _column_list(tokenize(create_sql)):
        if part[0].is_word(*TABLE_CONSTRAINT_STARTS):
            continue
        rest = part[1:]
        top = _top_level(part)[1:]
        definition = create_sql[rest[0].start : rest[-1].end] if rest else ""
        name = unquote(part[0])
        out[name.lower()] = ColumnDefinition(name, definition, _keywords(part, top), _default_value(create_sql, part, top))
    return out
