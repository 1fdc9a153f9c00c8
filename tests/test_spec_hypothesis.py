"""Fuzzing the loader: whatever the input, it returns a Cluster or raises SpecError — nothing else.

Inputs: arbitrary text, random YAML documents, and mutations of the examples (keys deleted,
values swapped for other types, random strings and numbers, extra and duplicated keys,
characters inserted or deleted). A spec that loads must also survive the render round trip.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marmot_appliance.errors import SpecError
from marmot_appliance.spec.loader import load_cluster_text
from marmot_appliance.spec.model import Cluster
from marmot_appliance.spec.render import cluster_to_dict
from tests.spec_helpers import EXAMPLES

# SPEC_FUZZ_EXAMPLES=5000 for a longer hunt; no deadline: the machine is shared and timing is not the point.
FUZZ = settings(
    max_examples=int(os.environ.get("SPEC_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BASE_DIR = EXAMPLES  # where the examples' schema files (notes.sql) are; loading writes nothing
EXAMPLE_TEXTS = [(EXAMPLES / name).read_text() for name in ("local-3-node.yaml", "lab-3-host.yaml")]
EXAMPLE_DOCS = [yaml.safe_load(text) for text in EXAMPLE_TEXTS]

SPEC_WORDS = [
    "apiVersion", "kind", "Cluster", "name", "nodes", "id", "host", "db", "advertise", "ports", "client",
    "cluster", "monitor", "metrics", "nats", "embedded", "urls", "auth", "mode", "tls", "replication",
    "shards", "log_replicas", "snapshots", "deploy", "no", "on", "yes", "0640", "1:30", "~", "null",
    "127.0.0.1", "10.77.0.11", "marmot-appliance/v1", "generated", "none", "user", "nats://x:4222",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(SPEC_WORDS),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(SPEC_WORDS), st.text(max_size=8)), children, max_size=4),
    ),
    max_leaves=20,
)


def load_or_spec_error(text: str) -> Cluster | None:
    try:
        cluster = load_cluster_text(text, "fuzz.yaml", base_dir=BASE_DIR)
    except SpecError as exc:
        assert exc.problems, "a SpecError must say what is wrong"
        assert all(isinstance(problem, str) and problem.startswith("fuzz.yaml") for problem in exc.problems)
        return None
    assert isinstance(cluster, Cluster)
    # Anything that loads renders to a spec that loads to the same cluster.
    again = load_cluster_text(yaml.safe_dump(cluster_to_dict(cluster)), "again.yaml", base_dir=BASE_DIR)
    assert dataclasses.replace(again, source=None) == dataclasses.replace(cluster, source=None)
    return cluster


def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += paths_of(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += paths_of(child, prefix + (index,))
    return paths


def set_at(document: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return document


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    load_or_spec_error(text)


@FUZZ
@given(json_values)
def test_random_yaml_documents(document):
    load_or_spec_error(yaml.safe_dump(document, allow_unicode=True))


@FUZZ
@given(st.data())
def test_mutated_examples(data):
    document = copy.deepcopy(data.draw(st.sampled_from(EXAMPLE_DOCS)))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(paths_of(document)))
        operation = data.draw(st.sampled_from(["delete", "replace", "add_key"]))
        if operation == "delete" and path:
            document = set_at(document, path, None, delete=True)
        elif operation == "add_key" and isinstance(_get(document, path), dict):
            key = data.draw(st.one_of(st.sampled_from(SPEC_WORDS), st.text(max_size=8)))
            _get(document, path)[key] = data.draw(json_values)
        else:
            document = set_at(document, path, data.draw(json_values))
    load_or_spec_error(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))


def _get(document: Any, path: tuple) -> Any:
    for part in path:
        document = document[part]
    return document


@FUZZ
@given(st.data())
def test_text_edits_of_examples(data):
    """Line duplication (duplicate keys), line deletion, and raw character edits."""
    lines = data.draw(st.sampled_from(EXAMPLE_TEXTS)).splitlines(keepends=True)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        index = data.draw(st.integers(min_value=0, max_value=len(lines) - 1))
        edit = data.draw(st.sampled_from(["duplicate", "delete", "insert", "replace_value"]))
        if edit == "duplicate":
            lines.insert(index, lines[index])
        elif edit == "delete" and len(lines) > 1:
            del lines[index]
        elif edit == "insert":
            line = lines[index]
            at = data.draw(st.integers(min_value=0, max_value=len(line)))
            lines[index] = line[:at] + data.draw(st.text(max_size=5)) + line[at:]
        elif ":" in lines[index]:
            key = lines[index].split(":", 1)[0]
            lines[index] = f"{key}: {data.draw(st.sampled_from(SPEC_WORDS + ['', '[', '{', '&a', '*a', '!!binary x']))}\n"
    load_or_spec_error("".join(lines))


def test_fuzz_inputs_do_reach_both_outcomes():
    """The strategies above are not vacuous: an example loads, and a broken one is refused."""
    assert load_or_spec_error(EXAMPLE_TEXTS[0]) is not None
    assert load_or_spec_error(EXAMPLE_TEXTS[1] + EXAMPLE_TEXTS[1].splitlines(keepends=True)[5]) is None
