"""docs/wire-format.md and the codec cannot drift: the worked example decodes as the doc says."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from marmot_appliance.feed import ChangeRecord, json_value
from marmot_appliance.replication.codec import FORMAT_VERSION, decode_batch, encode_batch
from marmot_appliance.replication.introspect import table_fingerprint
from marmot_appliance.spec.model import CompressionSettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def example_payload() -> bytes:
    (hex_block,) = fenced_blocks("hex")
    return bytes.fromhex("".join(hex_block.split()))


def stated_decoding() -> dict:
    return json.loads(fenced_blocks("json")[0])


def as_documented(batch) -> dict:
    return {
        "origin": batch.origin,
        "fingerprints": batch.fingerprints,
        "primary_keys": {table: list(pk) for table, pk in batch.primary_keys.items()},
        "rows": [
            {
                "table": row.table,
                "op": row.op,
                "pk": [json_value(v) for v in row.pk],
                "values": {c: json_value(v) for c, v in zip(row.columns, row.values)},
                "version": row.version,
                "origin": row.origin,
            }
            for row in batch.rows
        ],
    }


def test_worked_example_decodes_to_what_the_doc_states():
    payload = example_payload()
    assert f"all {len(payload)}\nbytes" in DOC.read_text() or f"all {len(payload)} bytes" in DOC.read_text()
    assert payload[0] == FORMAT_VERSION and payload[1] == 0
    assert as_documented(decode_batch(payload)) == stated_decoding()


def test_worked_example_is_what_the_encoder_writes():
    """Not a hand-made message: re-encoding the decoded batch gives the same bytes."""
    payload = example_payload()
    assert encode_batch(decode_batch(payload), CompressionSettings()) == payload


def test_stated_version_time_and_fingerprint_rule():
    batch = decode_batch(example_payload())
    upsert, tombstone = batch.rows
    assert upsert.version >> 16 == 1714564800000
    assert datetime.fromtimestamp((upsert.version >> 16) / 1000, tz=timezone.utc) == datetime(
        2024, 5, 1, 12, tzinfo=timezone.utc
    )
    assert (tombstone.version & 0xFFFF, tombstone.op, tombstone.columns) == (1, "delete", ("id",))
    columns, primary_key = ["id", "name", "avatar", "score"], ["id"]
    by_the_doc = hashlib.sha256(json.dumps([columns, primary_key], separators=(",", ":")).encode()).hexdigest()[:16]
    assert batch.fingerprints["users"] == by_the_doc == table_fingerprint(columns, primary_key)


def test_watch_line_example_matches_the_record_shape():
    line = next(block for block in fenced_blocks("json") if block.lstrip().startswith('{"table"'))
    example = json.loads(line)
    assert list(example) == list(ChangeRecord.__dataclass_fields__)
    upsert = decode_batch(example_payload()).rows[0]
    assert example["values"] == {c: json_value(v) for c, v in zip(upsert.columns, upsert.values)}


def test_python_example_is_short_valid_python_using_the_real_api():
    (example,) = fenced_blocks("python")
    compile(example, "wire-format.md", "exec")
    assert len(example.strip().splitlines()) <= 10
    assert "from marmot_appliance.feed import changes" in example
