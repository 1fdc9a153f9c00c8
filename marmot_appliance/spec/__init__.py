"""The cluster spec: JSON Schema validation, defaults, semantic checks, typed model."""
