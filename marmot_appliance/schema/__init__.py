"""The declared database schema: SQL files named by the spec's `schema:` (docs/schema.md)."""
