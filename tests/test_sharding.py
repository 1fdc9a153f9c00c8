"""Shard choice: stable across processes, in range, storage-class aware, roughly uniform."""

from __future__ import annotations

import subprocess
import sys

import pytest

from marmot_appliance.replication.sharding import row_key, shard_for, shard_numbers


def test_shards_are_one_based_and_in_range():
    seen = {shard_for("t", (i,), 8) for i in range(2000)}
    assert seen == set(shard_numbers(8)) == set(range(1, 9))


def test_single_shard_is_always_one():
    assert {shard_for("t", (i, "x"), 1) for i in range(100)} == {1}


def test_same_row_same_shard_in_another_process():
    """Python's hash() is salted per process; ours must not be."""
    keys = [("users", (1,)), ("users", ("a@b",)), ("t", (b"\x00\xff", 2.5, None)), ("ünï", (-(2**63),))]
    here = [shard_for(table, pk, 16) for table, pk in keys]
    code = (
        "from marmot_appliance.replication.sharding import shard_for;"
        f"print([shard_for(t, pk, 16) for t, pk in {keys!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == repr(here)


def test_storage_classes_are_distinct_keys():
    assert len({row_key("t", (1,)), row_key("t", (1.0,)), row_key("t", ("1",)), row_key("t", (b"1",))}) == 4


def test_table_name_is_part_of_the_key_without_ambiguity():
    # ("ab", ("c",)) and ("a", ("bc",)) must not collide through plain concatenation.
    assert row_key("ab", ("c",)) != row_key("a", ("bc",))
    assert row_key("t", ("a", "b")) != row_key("t", ("ab",))


def test_distribution_is_roughly_uniform():
    counts = [0] * 8
    for i in range(8000):
        counts[shard_for("orders", (f"order-{i}",), 8) - 1] += 1
    assert min(counts) > 700 and max(counts) < 1300, counts


def test_bad_shard_count_and_value_type():
    with pytest.raises(ValueError):
        shard_for("t", (1,), 0)
    with pytest.raises(TypeError):
        shard_for("t", (object(),), 4)
