-- The quick start's schema (examples/local-3-node.yaml: `schema: [notes.sql]`).
-- `marmot-appliance apply` creates what is missing on every node; add a column or a table here
-- and apply again to roll it out (docs/schema.md).
CREATE TABLE notes (
    id   TEXT PRIMARY KEY,
    body TEXT
);
