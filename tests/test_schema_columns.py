"""A column the schema files add to an existing table is added with its whole declaration
(docs/schema.md): COLLATE, CHECK and REFERENCES reach the node's database, and what
`ALTER TABLE … ADD COLUMN` cannot add (UNIQUE, PRIMARY KEY, a STORED generated column, …) is an
incompatible change `plan` names and `apply` refuses, never a constraint silently left out.
Real SQLite files; the declared text is read back from SQLite's own sqlite_schema."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from marmot_appliance.schema.migrate import SchemaMigrationError, migrate_database, plan_database
from marmot_appliance.schema.shape import SchemaShape
from tests.schema_support import assert_refused_unchanged, declare, make_db


def _notes_adding(tmp_path: Path, new_column: str, *more: str, key: str = "PRIMARY KEY") -> tuple[Path, SchemaShape]:
    """A database with tags and notes (one row each), and a declared schema whose notes table
    has `new_column` too (and the statements `more`)."""
    db = make_db(tmp_path / "n.db", "CREATE TABLE tags (name TEXT PRIMARY KEY)",
                 "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)",
                 "INSERT INTO tags VALUES ('red')", "INSERT INTO notes VALUES ('x', 'kept')")
    notes = f"CREATE TABLE notes (\n    id TEXT {key},\n    body TEXT,\n    {new_column}\n);\n"
    return db, declare(tmp_path, "CREATE TABLE tags (name TEXT PRIMARY KEY);\n" + notes + "".join(more))


def test_added_column_keeps_collate_check_and_references(tmp_path):
    db, declared = _notes_adding(
        tmp_path, "tag TEXT COLLATE NOCASE CHECK (length(tag) <= 8) REFERENCES tags (name) -- a comment, (with a paren"
    )
    assert [c.render() for c in plan_database(declared, db)] == ["+ column notes.tag"]
    migrate_database(db, declared)
    assert plan_database(declared, db) == []

    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("UPDATE notes SET tag = 'red' WHERE id = 'x'")
    assert conn.execute("SELECT id FROM notes WHERE tag = 'RED'").fetchall() == [("x",)]  # COLLATE NOCASE
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute("INSERT INTO notes VALUES ('y', 'b', 'far too long')")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY constraint failed"):
        conn.execute("INSERT INTO notes VALUES ('z', 'b', 'blue')")
    assert [(row[2], row[3], row[4]) for row in conn.execute("PRAGMA foreign_key_list(notes)")] == [
        ("tags", "tag", "name")
    ]
    conn.close()


def test_added_column_declared_in_awkward_sql_is_added_as_declared(tmp_path):
    """Quoted names with commas and parentheses, backticks, brackets, strings with commas,
    nested parentheses, comments and table constraints around the new columns."""
    db = make_db(tmp_path / "n.db", 'CREATE TABLE "odd, (table)" ([a b] TEXT, "c,d" TEXT, CONSTRAINT two CHECK ([a b] <> "c,d"))')
    declared = declare(tmp_path, (
        'CREATE TABLE "odd, (table)" (\n'
        "    [a b] TEXT, /* a comment, with ( */\n"
        '    "c,d" TEXT,\n'
        "    `e``f` VARCHAR(10, 2) DEFAULT 'x,(y' CHECK (`e``f` IN ('x,(y', ')', ',')),\n"
        "    'g h' TEXT COLLATE RTRIM CHECK ((length('g h') > 0) AND (1 = (1))),\n"
        "    CONSTRAINT two CHECK ([a b] <> \"c,d\")\n"
        ");\n"
    ))
    assert [c.render() for c in plan_database(declared, db)] == [
        "+ column odd, (table).e`f",
        "+ column odd, (table).g h",
    ]
    result = migrate_database(db, declared)
    assert len(result.applied) == 2
    conn = sqlite3.connect(db)
    assert conn.execute('PRAGMA table_xinfo("odd, (table)")').fetchall()[2:] == [
        (2, "e`f", "VARCHAR(10, 2)", 0, "'x,(y'", 0, 0),
        (3, "g h", "TEXT", 0, None, 0, 0),
    ]
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute("INSERT INTO \"odd, (table)\" (`e``f`) VALUES ('other')")
    conn.execute("INSERT INTO \"odd, (table)\" ('g h') VALUES ('p  ')")
    assert conn.execute("SELECT count(*) FROM \"odd, (table)\" WHERE \"g h\" = 'p'").fetchone() == (1,)  # RTRIM
    conn.close()


def test_added_column_whose_check_the_rows_fail_rolls_the_node_back(tmp_path):
    db, declared = _notes_adding(tmp_path, "tag TEXT DEFAULT 'too long' CHECK (length(tag) <= 3)",
                                 "CREATE TABLE orders (id TEXT PRIMARY KEY);")
    assert [c.render() for c in plan_database(declared, db)] == ["+ table orders", "+ column notes.tag"]
    assert_refused_unchanged(db, declared, "column notes.tag failed, nothing was changed: CHECK constraint failed",
                             SchemaMigrationError)


def test_unique_column_is_named_by_plan_and_refused_by_apply(tmp_path):
    db, declared = _notes_adding(tmp_path, "code TEXT CONSTRAINT one_code UNIQUE",
                                 "CREATE TABLE orders (id TEXT PRIMARY KEY);")
    assert [c.render() for c in plan_database(declared, db)] == [
        "+ table orders",
        "! column notes.code: a UNIQUE column cannot be added to an existing table; declare it without "
        "UNIQUE and add a CREATE UNIQUE INDEX on it (needs a manual migration)",
    ]
    assert_refused_unchanged(db, declared, "a UNIQUE column cannot be added")
    result = migrate_database(db, declared, skip_incompatible=True)
    assert [c.render() for c in result.applied] == ["+ table orders"]
    assert "code" not in [row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(notes)")]


@pytest.mark.parametrize("declaration, problem", [
    ("extra INTEGER PRIMARY KEY", "a primary-key column cannot be added to an existing table"),
    ("extra TEXT NOT NULL", "a NOT NULL column needs a non-NULL DEFAULT to be added to an existing table"),
    ("extra TEXT DEFAULT CURRENT_TIMESTAMP",
     "a column with the non-constant default CURRENT_TIMESTAMP cannot be added to an existing table"),
    ("extra TEXT DEFAULT (lower('A'))",
     "a column with the non-constant default (lower('A')) cannot be added to an existing table"),
    ("extra TEXT AS (upper(body)) STORED",
     "a STORED generated column cannot be added to an existing table (a VIRTUAL one can)"),
    ("extra TEXT DEFAULT 'red' REFERENCES tags (name)",
     "a REFERENCES column needs DEFAULT NULL to be added to an existing table (SQLite's rule when "
     "foreign keys are enforced)"),
])
def test_what_add_column_cannot_add_is_refused(tmp_path, declaration, problem):
    key = "" if "PRIMARY KEY" in declaration else "PRIMARY KEY"  # SQLite allows one
    db, declared = _notes_adding(tmp_path, declaration, key=key)
    rendered = [c.render() for c in plan_database(declared, db) if c.name == "notes.extra"]
    assert rendered == [f"! column notes.extra: {problem} (needs a manual migration)"]
    assert_refused_unchanged(db, declared, re.escape(problem))


def test_virtual_generated_column_is_added_with_its_expression(tmp_path):
    db, declared = _notes_adding(tmp_path, "shout TEXT GENERATED ALWAYS AS (upper(body)) VIRTUAL")
    assert [c.render() for c in plan_database(declared, db)] == ["+ column notes.shout"]
    migrate_database(db, declared)
    assert plan_database(declared, db) == []
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT shout FROM notes").fetchall() == [("KEPT",)]
    conn.close()


AWKWARD_TABLES = [
    # names that look like keywords, quoted keywords, unicode, a string as a name
    'CREATE TABLE k (key TEXT, "unique" INT UNIQUE, [check] CHECK ([check] > 0), généré REAL, \'s t\' DEFAULT \'a,b\')',
    # REFERENCES clauses whose words look like other constraints; DEFAULT NULL; signed and blob defaults
    "CREATE TABLE f (a REFERENCES p (x) ON DELETE SET DEFAULT ON UPDATE SET NULL NOT DEFERRABLE INITIALLY IMMEDIATE,"
    " b DEFAULT NULL, c DEFAULT -1.5e3, d DEFAULT x'00ff', e DEFAULT +7 NOT NULL, f DEFAULT (1) COLLATE NOCASE)",
    # generated columns, table constraints, a type with arguments, WITHOUT ROWID
    "CREATE TABLE g (id INTEGER NOT NULL, v AS (id * 2), s INT GENERATED ALWAYS AS ((id) + (1)) STORED,"
    " t NUMERIC(10, 2), PRIMARY KEY (id), UNIQUE (v, s), FOREIGN KEY (t) REFERENCES p (x)) WITHOUT ROWID",
    # comments between every token, a column without a type
    "CREATE TABLE /* ( */ c -- (\n ( a /* , */ , -- ,\n b TEXT /* ) */ )",
]


@pytest.mark.parametrize("create", AWKWARD_TABLES)
def test_column_definitions_match_what_sqlite_parsed(create):
    from marmot_appliance.schema.columns import column_definitions

    conn = sqlite3.connect(":memory:")
    conn.execute(create)
    (stored,) = conn.execute("SELECT sql FROM sqlite_schema WHERE type = 'table'").fetchone()
    table = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchone()[0]
    declared = column_definitions(stored)
    xinfo = conn.execute(f'PRAGMA table_xinfo("{table}")').fetchall()
    assert [d.name for d in declared.values()] == [row[1] for row in xinfo]
    # The definitions, declared again as a table of their own, mean what SQLite made of them
    # (the table constraints and WITHOUT ROWID are not part of any column's definition).
    again = ", ".join(f'"{d.name}" {d.definition}' for d in declared.values())
    conn.execute(f"CREATE TABLE again ({again})")
    columns = [row[1:5] + row[6:] for row in xinfo]  # name, type, NOT NULL, default, generated
    assert [row[1:5] + row[6:] for row in conn.execute("PRAGMA table_xinfo(again)")] == columns
    conn.close()


def test_column_definitions_name_the_constraints_and_the_default():
    from marmot_appliance.schema.columns import column_definitions

    declared = column_definitions(AWKWARD_TABLES[0] + ";")
    assert declared['unique'].keywords == {"UNIQUE"}
    assert declared["check"].keywords == {"CHECK"}
    assert declared["s t"].default == "'a,b'"
    references = column_definitions(AWKWARD_TABLES[1])
    assert references["a"].keywords == {"REFERENCES"}
    assert [references[c].keywords for c in "bef"] == [{"DEFAULT"}, {"DEFAULT", "NOT"}, {"DEFAULT", "COLLATE"}]
    assert references["a"].default is None  # ON DELETE SET DEFAULT is not a default
    assert [references[c].default for c in "bcdef"] == ["NULL", "-1.5e3", "x'00ff'", "+7", "(1)"]


def test_constraint_changes_on_existing_columns_and_table_constraints_are_named(tmp_path):
    """A COLLATE, CHECK, REFERENCES or UNIQUE that differs on a column the database has, or a
    table constraint (UNIQUE, CHECK, FOREIGN KEY) it lacks or has undeclared: SQLite cannot
    change these in place, so they are `!`, never ignored."""
    db = make_db(tmp_path / "n.db", "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT CHECK (body <> ''), "
                 "CHECK (id <> ''))", "INSERT INTO notes VALUES ('x', 'kept')")
    declared = declare(tmp_path, (
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT COLLATE NOCASE, tag TEXT,\n"
        "                    UNIQUE (body, tag), FOREIGN KEY (tag) REFERENCES tags (name));\n"
    ))
    assert [c.render() for c in plan_database(declared, db)] == [
        "! table notes: table constraint UNIQUE (body, tag) added: not supported (needs a manual migration)",
        "! table notes: table constraint FOREIGN KEY (tag) REFERENCES tags (name) added: not supported "
        "(needs a manual migration)",
        "! table notes: table constraint CHECK (id <> '') removed: not supported (needs a manual migration)",
        "! column notes.body: COLLATE NOCASE added, CHECK (body <> '') removed: not supported "
        "(needs a manual migration)",
        "+ column notes.tag",
    ]
    result = migrate_database(db, declared, skip_incompatible=True)
    assert [c.render() for c in result.applied] == ["+ column notes.tag"]


def test_the_same_constraints_written_differently_are_no_change(tmp_path):
    """Case, quoting, spacing, comments and constraint names do not make a difference."""
    db = make_db(tmp_path / "n.db", (
        'CREATE TABLE "Notes" ("id" text primary key, body TEXT collate nocase check(length(body)<9) '
        'references "Tags"("name") on delete set null, v as (upper(body)) virtual, '
        "constraint one unique(id,body) on conflict replace, check(id<>'a'))"
    ))
    declared = declare(tmp_path, (
        "CREATE TABLE notes (\n"
        "    id   TEXT PRIMARY KEY,\n"
        "    body TEXT COLLATE NOCASE CHECK (length(body) < 9) /* short */ REFERENCES tags (name) ON DELETE SET NULL,\n"
        "    v    GENERATED ALWAYS AS (upper(body)),\n"
        "    UNIQUE (id, body) ON CONFLICT REPLACE,\n"
        "    CONSTRAINT not_a CHECK (id <> 'a')\n"
        ");\n"
    ))
    assert plan_database(declared, db) == []
