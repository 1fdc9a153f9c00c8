"""The envelope around every message body, its headers and ids, and the bounds receivers enforce.

    byte 0   format version (FORMAT_VERSION)
    byte 1   flags: bit 0 set = the rest is one zstd frame; every other bit must be 0
    rest     CBOR body (RFC 8949), possibly zstd-compressed

docs/wire-format.md documents this for other applications; keep the two in step.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import zstandard

from marmot_appliance.replication.wire.errors import CodecError
from marmot_appliance.replication.wire.structure import MAX_CBOR_ITEMS, StructureCheck
from marmot_appliance.spec.model import CompressionSettings

MSG_ID_HEADER = "Nats-Msg-Id"
ORIGIN_HEADER = "Marmot-Origin"
# On every message of a publisher's round but the last of its shard: the rows that follow on
# this stream from the same origin belong with these (committed together, or in one read of
# committed rows), so the receiver applies them in the same SQLite transaction.
MORE_HEADER = "Marmot-More"

FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
KNOWN_FLAGS = FLAG_ZSTD

# A decoded body larger than this is refused: a tiny zstd frame can claim gigabytes.
MAX_DECODED_BYTES = 64 * 1024 * 1024
# Rows larger than one message travel as fragments: the CBOR body of the row's own one-row
# batch, cut into pieces that each fit a message. Its assembled size is bounded by this
# (64 MiB of values, plus names and keys), and the fragments of one row by MAX_FRAGMENTS.
MAX_ROW_BODY_BYTES = 68 * 1024 * 1024
MAX_FRAGMENTS = 1 << 16
# Envelope and CBOR around a fragment's piece: {"o": origin, "f": [index, count, piece]}.
FRAGMENT_OVERHEAD = 64
# Decompression proceeds in slices of this size, checked as they arrive: a bomb is refused
# after at most MAX_CBOR_ITEMS bytes (plus one slice) were ever decompressed.
_DECOMPRESS_SLICE = 128 * 1024


def message_id(node_id: int, log_ids: Sequence[int], payload: bytes) -> str:
    """Deterministic for the same rows: node, first and last log id, and a payload digest.

    The digest keeps two different batches from ever sharing an id (log ids can restart after
    the log table was emptied), while a retry of identical rows yields an identical id.
    """
    digest = hashlib.blake2b(payload, digest_size=8).hexdigest()
    return f"{node_id}-{log_ids[0]}-{log_ids[-1]}-{digest}"


class ZstdContexts:
    """Reusable zstd contexts, one set per thread (zstd contexts are not thread-safe).

    One instance may be shared by the event loop and `asyncio.to_thread` workers.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(self._local, "compressors", None)
        if compressors is None:
            compressors = self._local.compressors = {}
        compressor = compressors.get(level)
        if compressor is None:
            compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
        return compressor

    def decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor


def wrap(body: bytes, compression: CompressionSettings, contexts: ZstdContexts) -> bytes:
    """The message for a CBOR body: version, flags, and the body (compressed when it pays)."""
    if compression.level > 0 and len(body) >= compression.min_bytes:
        compressed = contexts.compressor(compression.level).compress(body)
        # Only worth it when it saves bytes; receivers then skip decompression too.
        if len(compressed) < len(body):
            return bytes((FORMAT_VERSION, FLAG_ZSTD)) + compressed
    return bytes((FORMAT_VERSION, 0)) + body


def unwrap(payload: bytes, max_decoded_bytes: int, contexts: ZstdContexts) -> bytes:
    """The checked CBOR body of a message (envelope, size, item count, nesting), undecoded."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < 2:
        raise CodecError(f"payload too short ({len(payload)} bytes) for the envelope")
    version, flags = payload[0], payload[1]
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported wire format version {version} (this build reads {FORMAT_VERSION})")
    if flags & ~KNOWN_FLAGS:
        raise CodecError(f"unknown envelope flags 0x{flags:02x}")
    body = payload[2:]
    if not flags & FLAG_ZSTD:
        if len(body) > max_decoded_bytes:
            raise CodecError(f"body of {len(body)} bytes exceeds {max_decoded_bytes}")
        if len(body) > MAX_CBOR_ITEMS:  # a shorter body cannot hold more items than bytes
            check_structure(body)
        return body
    return _decompress(body, max_decoded_bytes, contexts)


def check_structure(body: bytes) -> None:
    """Refuse a complete CBOR body with too many items, too deep, or of a shape never sent."""
    check = StructureCheck()
    check.feed(body)
    check.finish(body)


def _decompress(frame: bytes, limit: int, contexts: ZstdContexts) -> bytes:
    """The frame's content, decompressed slice by slice and checked as it arrives."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame: {exc}") from exc
    if declared < 0:
        raise CodecError("zstd frame does not declare its content size")
    if declared > limit:
        raise CodecError(f"compressed body declares {declared} bytes, limit is {limit}")
    try:
        if declared <= MAX_CBOR_ITEMS:  # too short to hold too many items: no need to count
            return contexts.decompressor().decompress(frame, allow_extra_data=False)
        check = StructureCheck()
        body = bytearray()
        reader = contexts.decompressor().stream_reader(frame, read_across_frames=True)
        while True:
            piece = reader.read(_DECOMPRESS_SLICE)
            if not piece:
                break
            body += piece
            if len(body) > declared:
                raise CodecError(f"zstd frame holds more than the {declared} bytes it declares")
            check.feed(body)
        if len(body) != declared:
            raise CodecError(f"zstd frame holds {len(body)} bytes, it declares {declared}")
        check.finish(body)
        return bytes(body)
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame: {exc}") from exc


def uncompressed_size(payload: bytes) -> int:
    """Envelope size before compression, without decompressing (zstd frames declare it).

    Never raises: it only sizes runs of messages, and a frame it cannot read (or a size beyond
    the decoder's limit) counts as its own length; decoding that message later refuses it and
    the consumer dead-letters it. (A raw ZstdError here once stalled a shard forever.)
    """
    if len(payload) > 2 and payload[1] & FLAG_ZSTD:
        try:
            declared = zstandard.frame_content_size(payload[2:])
        except zstandard.ZstdError:
            return len(payload)
        if 0 <= declared <= MAX_DECODED_BYTES:
            return declared + 2
    return len(payload)
