"""The column definitions and table constraints of a CREATE TABLE statement, as declared.

`PRAGMA table_xinfo` reports a column's type, NOT NULL, default, key position and generated-ness,
but not its COLLATE, CHECK, REFERENCES or UNIQUE, nor the table's own constraints. To add a
declared column with all of it, and to see constraints that differ, the table's CREATE statement
as SQLite stores it (`sqlite_schema.sql`, kept as written and already accepted by SQLite's
parser, so the text is well-formed) is cut into its parts. The cutting is done on tokens, never
with a regular expression over the whole statement: a comma or parenthesis inside a string
('a,b'), a quoted name ("a,(b", `a,b`, [a,b]), a comment or a nested expression
(CHECK ((a) > (b))) does not end a definition.

Constraints compare by `Constraint.key`: their tokens with case, quoting, spacing, comments and
the constraint's name left out, so the same constraint written another way is no difference.
Only what table_xinfo does not show is compared here (COLLATE, CHECK, REFERENCES, UNIQUE, a
generated column's expression, table UNIQUE / CHECK / FOREIGN KEY): the type, NOT NULL, DEFAULT
and the primary key compare through table_xinfo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .sqltokens import SqlTextError, Token, tokenize, unquote


class DeclarationError(SqlTextError):
    """A CREATE TABLE text could not be cut into its column definitions."""


@dataclass(frozen=True)
class Constraint:
    key: str  # what compares: normalized tokens (see the module doc)
    text: str  # as written, for messages


@dataclass(frozen=True)
class ColumnDefinition:
    name: str  # unquoted, as SQLite reports it
    definition: str  # what follows the name: type and constraints as written ("" for none)
    keywords: frozenset[str]  # its constraints by keyword: UNIQUE, REFERENCES, CHECK, NOT (NULL), AS, ...
    default: str | None  # the DEFAULT value as written ("'x'", "-1", "(lower('A'))"), None without one
    constraints: tuple[Constraint, ...] = ()  # its COLLATE, CHECK, REFERENCES, UNIQUE and AS (generated)


@dataclass(frozen=True)
class TableDeclaration:
    columns: dict[str, ColumnDefinition]  # by lower-case name, in declaration order
    constraints: tuple[Constraint, ...]  # its UNIQUE, CHECK and FOREIGN KEY table constraints


# Keywords that start a column constraint. None of them can be an unquoted name in SQLite (they
# are not in its parser's fallback-to-identifier list), so a bare one at the top level of a
# column definition is that constraint and nothing else.
CONSTRAINT_KEYWORDS = frozenset(
    ("CONSTRAINT", "PRIMARY", "NOT", "NULL", "UNIQUE", "CHECK", "DEFAULT", "COLLATE", "REFERENCES", "AS")
)
# A part of the column list that starts with one of these is a table constraint, not a column.
TABLE_CONSTRAINT_STARTS = ("CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN")
# The column constraints compared here; the others compare through table_xinfo.
COMPARED = ("COLLATE", "CHECK", "REFERENCES", "UNIQUE", "AS")
_SPACE = re.compile(r"\s+")


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


def _clause_starts(part: list[Token], top: list[tuple[int, Token]]) -> list[tuple[int, str]]:
    """(index, keyword) where each constraint of a column definition starts (NOT for NOT NULL,
    AS for a generated column). Words of a REFERENCES clause (ON DELETE SET NULL / SET DEFAULT,
    NOT DEFERRABLE) and a DEFAULT's NULL value are not constraints of their own."""
    starts = []
    for index, token in top:
        before = part[index - 1] if index > 0 else None
        after = part[index + 1] if index + 1 < len(part) else None
        word = token.text.upper()
        if token.is_word("GENERATED") and after is not None and after.is_word("ALWAYS"):
            starts.append((index, "AS"))
            continue
        if not token.is_word(*CONSTRAINT_KEYWORDS):
            continue
        if word in ("NULL", "DEFAULT") and before is not None and before.is_word("SET"):
            continue
        if word == "NOT" and after is not None and after.is_word("DEFERRABLE"):
            continue
        if word == "NULL" and before is not None and before.is_word("NOT", "DEFAULT"):
            continue
        if word == "AS" and before is not None and before.is_word("ALWAYS"):
            continue
        starts.append((index, word))
    return starts


def _normalized(tokens: list[Token]) -> str:
    """The tokens as they compare: keywords and names in one case, names unquoted."""
    return " ".join(
        unquote(token).upper() if token.kind == "name" else token.text.upper() if token.kind == "word" else token.text
        for token in tokens
    )


def _constraint(sql: str, tokens: list[Token], keyword: str) -> Constraint:
    text = _SPACE.sub(" ", sql[tokens[0].start : tokens[-1].end])
    if keyword == "AS":  # GENERATED ALWAYS AS (e) [VIRTUAL|STORED] compares by its expression
        opening = next(i for i, token in enumerate(tokens) if token.is_punct("("))
        return Constraint("AS " + _normalized(tokens[opening : _group_end(tokens, opening)]), text)
    return Constraint(_normalized(tokens), text)


def _column_constraints(sql: str, part: list[Token], starts: list[tuple[int, str]]) -> tuple[Constraint, ...]:
    ends = [index for index, _word in starts[1:]] + [len(part)]
    return tuple(
        _constraint(sql, part[index:end], word) for (index, word), end in zip(starts, ends) if word in COMPARED
    )


def _table_constraint(sql: str, part: list[Token]) -> Constraint | None:
    """A table constraint without its name; None for the PRIMARY KEY (compared through table_xinfo)."""
    if part[0].is_word("CONSTRAINT"):
        part = part[2:]
    if not part or part[0].is_word("PRIMARY"):
        return None
    return _constraint(sql, part, part[0].text.upper())


def read_table(create_sql: str) -> TableDeclaration:
    """The columns and table constraints of a CREATE TABLE text."""
    columns: dict[str, ColumnDefinition] = {}
    constraints: list[Constraint] = []
    for part in _column_list(tokenize(create_sql)):
        if part[0].is_word(*TABLE_CONSTRAINT_STARTS):
            constraint = _table_constraint(create_sql, part)
            constraints += [constraint] if constraint else []
            continue
        rest = part[1:]
        top = _top_level(part)[1:]
        starts = _clause_starts(part, top)
        definition = create_sql[rest[0].start : rest[-1].end] if rest else ""
        name = unquote(part[0])
        columns[name.lower()] = ColumnDefinition(
            name, definition, frozenset(word for _index, word in starts), _default_value(create_sql, part, top),
            _column_constraints(create_sql, part, starts),
        )
    return TableDeclaration(columns, tuple(constraints))


def column_definitions(create_sql: str) -> dict[str, ColumnDefinition]:
    """Lower-case column name -> its definition, for every column of a CREATE TABLE text."""
    return read_table(create_sql).columns
