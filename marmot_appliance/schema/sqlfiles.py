"""Read and check the spec's schema files: CREATE TABLE / INDEX / VIEW / TRIGGER only.

SQLite itself is the parser: each file is cut into statements with `sqlite3.complete_statement`
(which knows about strings, comments and trigger bodies), every statement is executed, in
order, in one in-memory database, and what SQLite refuses is reported at the statement's place
as `file:line:col: message`. Nothing here parses SQL by hand beyond reading the first keywords
of a statement to know what kind it is.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.replication.types import BOOKKEEPING_PREFIX
from marmot_appliance.spec.problems import Mark, Problem

from .sqltokens import skip_blank

MAX_SCHEMA_FILE_BYTES = 4 * 1024 * 1024
ALLOWED_KINDS = ("TABLE", "INDEX", "VIEW", "TRIGGER")
_WORD = re.compile(r"[A-Za-z_]+")
_NEAR = re.compile(r'near "(.+?)": syntax error')


@dataclass(frozen=True)
class Statement:
    """One declared statement and where it was written."""

    source: str  # the file as shown in messages
    mark: Mark
    sql: str


@dataclass(frozen=True)
class DeclaredFiles:
    """Every statement of the schema files, in file order."""

    statements: tuple[Statement, ...] = ()

    def database(self) -> sqlite3.Connection:
        """An in-memory database holding the declared schema (the files were checked already)."""
        conn = sqlite3.connect(":memory:", isolation_level=None)
        for statement in self.statements:
            conn.execute(statement.sql)
        return conn


def _line_column(text: str, position: int) -> Mark:
    before = text[:position]
    return Mark(before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1)


def _leading_words(text: str, position: int, count: int) -> list[str]:
    words = []
    for _ in range(count):
        position = skip_blank(text, position)
        match = _WORD.match(text, position)
        if not match:
            break
        words.append(match.group(0).upper())
        position = match.end()
    return words


def split_statements(text: str) -> tuple[list[tuple[int, str]], int | None]:
    """(start offset, statement text) for each complete statement, and the offset of an
    incomplete statement left at the end (None when the text ends cleanly)."""
    statements: list[tuple[int, str]] = []
    start = 0
    position = text.find(";")
    while position >= 0:
        chunk = text[start : position + 1]
        if sqlite3.complete_statement(chunk):
            first = skip_blank(text, start)
            if first < position:  # not an empty statement (";;")
                statements.append((first, text[first : position + 1]))
            start = position + 1
        position = text.find(";", position + 1)
    tail = skip_blank(text, start)
    if tail >= len(text):
        return statements, None
    if sqlite3.complete_statement(text[tail:] + "\n;"):  # a last statement without its ';'
        statements.append((tail, text[tail:] + "\n;"))
        return statements, None
    return statements, tail


def _kind_problem(words: list[str]) -> str | None:
    """Why a statement starting with `words` is not allowed in a schema file (None: allowed)."""
    if not words or words[0] != "CREATE":
        shown = words[0] if words else "this"
        return f"{shown} statement not allowed: schema files hold only CREATE TABLE, INDEX, VIEW and TRIGGER"
    kind = words[1] if len(words) > 1 else ""
    if kind == "UNIQUE":
        kind = words[2] if len(words) > 2 else ""
    if kind in ("TEMP", "TEMPORARY"):
        return "CREATE TEMP not allowed: a temporary object lives in one connection only; declare it without TEMP"
    if kind == "VIRTUAL":
        return "CREATE VIRTUAL TABLE not allowed: virtual tables are not replicated; create them in the application"
    if kind not in ALLOWED_KINDS:
        return f"CREATE {kind or '?'} not allowed: schema files hold only CREATE TABLE, INDEX, VIEW and TRIGGER"
    return None


def _syntax_error_offset(conn: sqlite3.Connection, statement: str, token: str) -> int | None:
    """Which occurrence of `token` SQLite stopped at: the first one where the statement cut just
    after it already fails with the same error (EXPLAIN compiles without running anything).
    Python's sqlite3 does not expose sqlite3_error_offset()."""
    found = statement.find(token)
    while found >= 0:
        try:
            conn.execute("EXPLAIN " + statement[: found + len(token)])
        except sqlite3.Error as exc:
            if f'near "{token}": syntax error' in str(exc):
                return found
        found = statement.find(token, found + 1)
    return None


def _error_mark(conn: sqlite3.Connection, text: str, start: int, statement: str, message: str) -> Mark:
    """Where SQLite's error points: the token it names (`near "X"`), else the statement."""
    near = _NEAR.search(message)
    if near:
        found = _syntax_error_offset(conn, statement, near.group(1))
        if found is not None:
            return _line_column(text, start + found)
    return _line_column(text, start)


def check_sql_text(text: str, source: str, conn: sqlite3.Connection) -> tuple[list[Statement], list[Problem]]:
    """Execute the statements of one file into `conn`; the good ones and the located problems."""
    statements: list[Statement] = []
    problems: list[Problem] = []
    chunks, incomplete_at = split_statements(text)
    for start, sql in chunks:
        mark = _line_column(text, start)
        refused = _kind_problem(_leading_words(sql, 0, 3))
        if refused:
            problems.append(Problem(source, mark, None, refused))
            continue
        before = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
        try:
            conn.execute(sql)
        except (sqlite3.Error, sqlite3.Warning) as exc:
            problems.append(Problem(source, _error_mark(conn, text, start, sql, str(exc)), None, str(exc)))
            continue
        created = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")} - before
        reserved = sorted(name for name in created if name.startswith(BOOKKEEPING_PREFIX))
        if reserved:
            problems.append(Problem(source, mark, None, f"{reserved[0]!r}: names starting with {BOOKKEEPING_PREFIX!r} are reserved for replication bookkeeping"))
            continue
        statements.append(Statement(source, mark, sql))
    if incomplete_at is not None:
        problems.append(
            Problem(source, _line_column(text, incomplete_at), None, "incomplete statement (unterminated string, comment or trigger body?)")
        )
    return statements, problems


def _read(path: Path) -> str:
    with path.open("rb") as handle:
        raw = handle.read(MAX_SCHEMA_FILE_BYTES + 1)
    if len(raw) > MAX_SCHEMA_FILE_BYTES:
        raise ValueError(f"larger than {MAX_SCHEMA_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_schema_files(files: list[tuple[str, Path]]) -> tuple[DeclaredFiles, list[Problem]]:
    """Check (shown name, path) files in order, all into one database: later files may refer
    to tables of earlier ones. A file that cannot be read is a problem at its first line."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    statements: list[Statement] = []
    problems: list[Problem] = []
    try:
        for shown, path in files:
            try:
                text = _read(path)
            except FileNotFoundError:
                problems.append(Problem(shown, None, None, "no such file"))
                continue
            except IsADirectoryError:
                problems.append(Problem(shown, None, None, "is a directory, expected an SQL file"))
                continue
            except (OSError, ValueError) as exc:
                problems.append(Problem(shown, None, None, f"cannot read: {getattr(exc, 'strerror', None) or exc}"))
                continue
            good, bad = check_sql_text(text, shown, conn)
            statements += good
            problems += bad
    finally:
        conn.close()
    return DeclaredFiles(tuple(statements)), problems
