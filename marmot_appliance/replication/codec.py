"""The wire codec's public face: one import for everything that reads or writes the wire.

The codec itself lives in replication/wire/ (docs/wire-format.md describes the format):
envelope.py (version, flags, zstd, headers, message ids, limits), structure.py (the CBOR item
bound), encode.py (the one body builder, from RowChange objects or raw log rows), document.py
and grouped.py (the strict and the fast reader), decode.py (messages into batches).
replication/batching.py cuts a publisher's rows into messages. This module re-exports them
for the many callers that say `codec.X`.
"""

from __future__ import annotations

from marmot_appliance.replication.types import ChangeBatch
from marmot_appliance.replication.wire.decode import (
    Decoder,
    decode_assembled,
    decode_batch,
    decode_for_apply,
    decode_message,
)
from marmot_appliance.replication.wire.document import OPS, Fragment
from marmot_appliance.replication.wire.encode import (
    BodyMap,
    Encoder,
    body_map,
    encode_batch,
    encode_body,
    fragment_payloads,
    log_rows_body,
)
from marmot_appliance.replication.wire.envelope import (
    FLAG_ZSTD,
    FORMAT_VERSION,
    FRAGMENT_OVERHEAD,
    KNOWN_FLAGS,
    MAX_DECODED_BYTES,
    MAX_FRAGMENTS,
    MAX_ROW_BODY_BYTES,
    MORE_HEADER,
    MSG_ID_HEADER,
    ORIGIN_HEADER,
    message_id,
    uncompressed_size,
)
from marmot_appliance.replication.wire.errors import CodecError
from marmot_appliance.replication.wire.grouped import GroupedBatch, RowGroup
from marmot_appliance.replication.wire.structure import MAX_CBOR_DEPTH, MAX_CBOR_ITEMS, StructureCheck
from marmot_appliance.spec.model import CompressionSettings

__all__ = [
    "FLAG_ZSTD",
    "FORMAT_VERSION",
    "FRAGMENT_OVERHEAD",
    "KNOWN_FLAGS",
    "MAX_CBOR_DEPTH",
    "MAX_CBOR_ITEMS",
    "MAX_DECODED_BYTES",
    "MAX_FRAGMENTS",
    "MAX_ROW_BODY_BYTES",
    "MORE_HEADER",
    "MSG_ID_HEADER",
    "OPS",
    "ORIGIN_HEADER",
    "BatchCodec",
    "BodyMap",
    "CodecError",
    "Fragment",
    "GroupedBatch",
    "RowGroup",
    "StructureCheck",
    "body_map",
    "decode_assembled",
    "decode_batch",
    "decode_for_apply",
    "decode_message",
    "encode_batch",
    "encode_body",
    "fragment_payloads",
    "log_rows_body",
    "message_id",
    "uncompressed_size",
]


class BatchCodec(Decoder):
    """A Decoder that also encodes (its own zstd contexts; a decoded-size limit of its own)."""

    def __init__(self, max_decoded_bytes: int = MAX_DECODED_BYTES):
        super().__init__(max_decoded_bytes)
        self._encoder = Encoder()

    def encode(self, batch: ChangeBatch, compression: CompressionSettings | None = None) -> bytes:
        return self._encoder.encode(batch, compression)

    def encode_body(self, body: BodyMap, compression: CompressionSettings | None = None) -> bytes:
        return self._encoder.encode_body(body, compression)

    def fragment_payloads(
        self, body: BodyMap, piece_bytes: int, compression: CompressionSettings | None = None
    ) -> list[bytes]:
        return self._encoder.fragment_payloads(body, piece_bytes, compression)
