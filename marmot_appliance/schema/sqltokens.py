"""SQL text as tokens: words, numbers, strings, quoted names and punctuation.

A small lexer for the text SQLite has already accepted (the declared schema as `sqlite_schema`
stores it), enough to find where one part of a statement ends: it knows SQLite's quoting
('..', "..", `..`, [..], X'..') and comments (--, /* */), so a comma or parenthesis inside them
is not taken for punctuation. It does not check SQL; SQLite did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from marmot_appliance.errors import MarmotError


class SqlTextError(MarmotError):
    """The text could not be cut into tokens (an unterminated quote)."""


@dataclass(frozen=True)
class Token:
    kind: str  # word, number, string (also X'..' blobs), name (a quoted identifier), punct
    text: str
    start: int
    end: int

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words

    def is_punct(self, *characters: str) -> bool:
        return self.kind == "punct" and self.text in characters


def skip_blank(text: str, position: int) -> int:
    """The position of the next character that is neither whitespace nor inside a comment."""
    while position < len(text):
        if text[position].isspace():
            position += 1
        elif text.startswith("--", position):
            end = text.find("\n", position)
            position = len(text) if end < 0 else end + 1
        elif text.startswith("/*", position):
            end = text.find("*/", position + 2)
            position = len(text) if end < 0 else end + 2
        else:
            break
    return position


_WORD = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
_NUMBER = re.compile(r"0[xX][0-9A-Fa-f]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_CLOSING = {'"': '"', "`": "`", "[": "]", "'": "'"}


def _quoted_end(sql: str, start: int) -> int:
    """The end of the quoted token opening at `start`: '..', "..", `..` double their quote to
    escape it; [..] has no escape."""
    close = _CLOSING[sql[start]]
    position = start + 1
    while True:
        found = sql.find(close, position)
        if found < 0:
            raise SqlTextError(f"unterminated {sql[start]} at offset {start}")
        if close != "]" and sql.startswith(close * 2, found):
            position = found + 2
            continue
        return found + 1


def tokenize(sql: str) -> list[Token]:
    """The tokens of `sql`, comments and whitespace left out."""
    tokens: list[Token] = []
    position = 0
    while (position := skip_blank(sql, position)) < len(sql):
        char = sql[position]
        if char in _CLOSING:
            end = _quoted_end(sql, position)
            tokens.append(Token("string" if char == "'" else "name", sql[position:end], position, end))
            position = end
        elif char in "xX" and sql.startswith("'", position + 1):  # a blob literal X'00ff'
            end = _quoted_end(sql, position + 1)
            tokens.append(Token("string", sql[position:end], position, end))
            position = end
        elif (number := _NUMBER.match(sql, position)) and (char.isdigit() or char == "."):
            tokens.append(Token("number", number.group(0), position, number.end()))
            position = number.end()
        elif word := _WORD.match(sql, position):
            tokens.append(Token("word", word.group(0), position, word.end()))
            position = word.end()
        else:
            tokens.append(Token("punct", char, position, position + 1))
            position += 1
    return tokens


def unquote(token: Token) -> str:
    """The name a name token stands for (SQLite also accepts a 'string' as a column name)."""
    if token.kind in ("name", "string") and token.text[0] in _CLOSING:
        quote = token.text[0]
        inner = token.text[1:-1]
        return inner if quote == "[" else inner.replace(quote * 2, quote)
    return token.text
