"""The schema itself: well-formed, strict, described, documented, and in sync with the model."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from typing import Any, Iterator

import pytest
import yaml
from jsonschema import Draft202012Validator

from marmot_appliance.errors import SpecError
from marmot_appliance.spec import model
from marmot_appliance.spec.loader import load_cluster, load_cluster_text
from marmot_appliance.spec.render import cluster_to_dict
from marmot_appliance.spec.schema import SCHEMA_FILE, load_schema, schema_path
from tests.spec_helpers import EXAMPLES, MINIMAL, REPO


def walk_properties(schema: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(dotted path, property schema) for every property, `nodes[]` for array items."""
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path, prop
        yield from walk_properties(prop, path + ".")
        if "else" in prop:  # nats.auth: a string shorthand or an object
            yield from walk_properties(prop["else"], path + ".")
        items = prop.get("items", {})
        if "properties" in items:
            yield from walk_properties(items, path + "[].")


def walk_schemas(schema: Any, where: str = "$") -> Iterator[tuple[str, dict]]:
    if isinstance(schema, dict):
        yield where, schema
        for key, value in schema.items():
            yield from walk_schemas(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from walk_schemas(value, f"{where}/{index}")


def test_schema_is_valid_draft_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_schema_path_finds_the_shipped_file():
    path = schema_path()
    assert path.name == SCHEMA_FILE and path.is_file()
    # The wheel ships repo schemas/ as marmot_appliance/schemas/, the first place schema_path looks.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    force_include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force_include["schemas"] == "marmot_appliance/schemas"
    assert (REPO / "schemas" / SCHEMA_FILE).read_text() == path.read_text()


def test_every_property_has_a_description():
    missing = [path for path, prop in walk_properties(load_schema()) if not prop.get("description", "").strip()]
    assert missing == []


def test_every_object_refuses_unknown_properties():
    loose = [
        where
        for where, sub in walk_schemas(load_schema())
        if "properties" in sub and sub.get("additionalProperties") is not False
    ]
    assert loose == []


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside `X`, `X | None` or `tuple[X, ...]`."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def _model_field(path: str) -> tuple[type, dataclasses.Field]:
    parts = [part.removesuffix("[]") for part in path.split(".")]
    cls: type = model.Cluster
    for part in parts[:-1]:
        cls = _dataclass_of(typing.get_type_hints(cls)[part])
        assert cls is not None, path
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert parts[-1] in fields, f"schema property {path} has no model field {cls.__name__}.{parts[-1]}"
    return cls, fields[parts[-1]]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def test_schema_defaults_equal_model_dataclass_defaults():
    checked = 0
    for path, prop in walk_properties(load_schema()):
        if "default" not in prop:
            continue
        _, field = _model_field(path)
        default = _default(field)
        if path == "nats.auth":  # the shorthand string stands for NatsAuth(mode=...)
            default = default.mode
        assert prop["default"] == _plain(default), path
        assert type(prop["default"]) is type(_plain(default)) or prop["default"] is None, path
        checked += 1
    assert checked >= 40


def test_every_model_field_is_a_schema_property():
    schema_paths = {path.replace("[]", "") for path, _ in walk_properties(load_schema())}
    # Where the spec came from; apiVersion is top-level; nodes_known is False only in flag mode
    # (no spec at all), never written in one.
    not_in_spec = {"source", "api_version", "nodes_known"}

    def fields_of(cls: type, prefix: str) -> Iterator[str]:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in not_in_spec:
                continue
            yield prefix + field.name
            inner = _dataclass_of(hints[field.name])
            if inner is not None:
                yield from fields_of(inner, prefix + field.name + ".")

    missing = sorted(set(fields_of(model.Cluster, "")) - schema_paths)
    assert missing == []


def test_every_schema_property_is_documented():
    docs = (REPO / "docs" / "spec.md").read_text()
    undocumented = [path for path, _ in walk_properties(load_schema()) if f"`{path}`" not in docs]
    assert undocumented == []


def test_docs_show_the_real_validate_output_of_invalid_example(monkeypatch):
    docs = (REPO / "docs" / "spec.md").read_text()
    shown = re.findall(r"^# (examples/invalid\.yaml:\d+:\d+: .*)$", docs, flags=re.MULTILINE)
    monkeypatch.chdir(REPO)
    with pytest.raises(SpecError) as caught:
        load_cluster("examples/invalid.yaml")
    assert len(shown) >= 6 and shown == caught.value.problems


@pytest.mark.parametrize("example", ["local-3-node.yaml", "lab-3-host.yaml"])
def test_rendered_spec_validates_and_loads_to_the_same_cluster(example, tmp_path):
    cluster = load_cluster(EXAMPLES / example)
    document = cluster_to_dict(cluster)
    Draft202012Validator(load_schema()).validate(document)
    text = yaml.safe_dump(document, sort_keys=False)
    again = load_cluster_text(text, "shown.yaml", base_dir=tmp_path)
    assert dataclasses.replace(again, source=cluster.source) == cluster
    assert cluster_to_dict(again) == document


def test_rendered_minimal_spec_is_fully_defaulted():
    document = cluster_to_dict(load_cluster_text(MINIMAL))
    schema_paths = [path for path, _ in walk_properties(load_schema())]

    def present(data: Any, parts: list[str]) -> bool:
        if not parts:
            return True
        head, rest = parts[0], parts[1:]
        if head.endswith("[]"):
            return all(present(item, rest) for item in data[head[:-2]])
        if not isinstance(data, dict) or head not in data:
            return False
        return data[head] is None or present(data[head], rest)  # e.g. tls: null has no cert

    missing = [path for path in schema_paths if not present(document, path.split("."))]
    assert missing == []
