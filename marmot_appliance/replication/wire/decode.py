"""Messages into change batches: the envelope unwrapped, the CBOR bounded, the document checked.

Anything malformed raises CodecError and never another error: consumers dead-letter on
CodecError alone. cbor2 runs with a depth limit and no duplicate keys, after the envelope's
StructureCheck bounded the item count of any body that could hold too many.
"""

from __future__ import annotations

from typing import Any

import cbor2

from marmot_appliance.replication.types import ChangeBatch
from marmot_appliance.replication.wire.document import (
    Fragment,
    batch_from_document,
    fragment_from_document,
    is_fragment,
)
from marmot_appliance.replication.wire.envelope import (
    MAX_DECODED_BYTES,
    MAX_ROW_BODY_BYTES,
    ZstdContexts,
    check_structure,
    unwrap,
)
from marmot_appliance.replication.wire.errors import CodecError, malformed
from marmot_appliance.replication.wire.grouped import GroupedBatch, grouped_from_document
from marmot_appliance.replication.wire.structure import MAX_CBOR_DEPTH, MAX_CBOR_ITEMS


def _loads(body: bytes) -> Any:
    try:
        return cbor2.loads(body, max_depth=MAX_CBOR_DEPTH, allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises value, type, overflow and memory errors
        raise CodecError(f"malformed CBOR body: {exc}") from exc


def _grouped_or_none(document: Any) -> GroupedBatch | None:
    try:
        return grouped_from_document(document)
    except Exception:  # noqa: BLE001 - the strict decoder names the problem precisely
        return None


class Decoder:
    """Decoder with its own zstd contexts and decoded-size limit (thread-safe: per thread)."""

    def __init__(self, max_decoded_bytes: int = MAX_DECODED_BYTES):
        self.max_decoded_bytes = max_decoded_bytes
        self.contexts = ZstdContexts()

    def body(self, payload: bytes) -> bytes:
        """The checked CBOR body of a payload (envelope, size, item count, nesting), undecoded."""
        return unwrap(payload, self.max_decoded_bytes, self.contexts)

    def _document(self, payload: bytes) -> Any:
        """The CBOR document of a payload, its size and shape bounded before any object is built."""
        return _loads(self.body(payload))

    def decode(self, payload: bytes) -> ChangeBatch:
        """The batch in `payload`. Anything malformed raises CodecError, never another error."""
        try:
            return batch_from_document(self._document(payload))
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc

    def decode_for_apply(self, payload: bytes) -> ChangeBatch | GroupedBatch | Fragment:
        """Like decode(), but a well-formed batch comes back as a GroupedBatch (no per-row objects),
        and a fragment of a large row as a Fragment.

        Only the common shape takes the fast path (every group derives its keys from its values,
        no row carries an explicit key); anything else, malformed input included, goes through
        decode() and gives exactly its result or its CodecError.
        """
        try:
            document = self._document(payload)
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc
        if is_fragment(document):
            return fragment_from_document(document)
        grouped = _grouped_or_none(document)
        if grouped is not None:
            return grouped
        # The fast path may have appended to the row lists before it gave up: parse again.
        return self.decode(payload)

    def decode_message(self, payload: bytes) -> ChangeBatch | Fragment:
        """decode(), except that a fragment of a large row comes back as a Fragment (the feed)."""
        try:
            document = self._document(payload)
            if is_fragment(document):
                return fragment_from_document(document)
            return batch_from_document(document)
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc

    def decode_assembled(self, body: bytes, *, for_apply: bool = True) -> ChangeBatch | GroupedBatch:
        """The batch in the reassembled pieces of a large row's fragments (a bare CBOR body)."""
        try:
            if len(body) > MAX_ROW_BODY_BYTES:
                raise CodecError(f"a large row's body of {len(body)} bytes exceeds {MAX_ROW_BODY_BYTES}")
            if len(body) > MAX_CBOR_ITEMS:
                check_structure(body)
            document = _loads(body)
            if is_fragment(document):
                raise malformed("a large row's body is itself a fragment")
            if for_apply:
                grouped = _grouped_or_none(document)
                if grouped is not None:
                    return grouped
                document = cbor2.loads(body, max_depth=MAX_CBOR_DEPTH, allow_duplicate_keys=False)
            return batch_from_document(document)
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed large row: {type(exc).__name__}: {exc}") from exc


_shared = Decoder()


def decode_batch(payload: bytes) -> ChangeBatch:
    """Decode with the module's shared decoder; raises CodecError on anything malformed."""
    return _shared.decode(payload)


def decode_for_apply(payload: bytes) -> ChangeBatch | GroupedBatch | Fragment:
    """decode_batch, but the common shape comes back as a GroupedBatch (see Decoder)."""
    return _shared.decode_for_apply(payload)


def decode_message(payload: bytes) -> ChangeBatch | Fragment:
    """decode_batch, but a fragment of a large row comes back as a Fragment."""
    return _shared.decode_message(payload)


def decode_assembled(body: bytes, *, for_apply: bool = True) -> ChangeBatch | GroupedBatch:
    """The batch of a large row from its joined fragment pieces (see Decoder)."""
    return _shared.decode_assembled(body, for_apply=for_apply)
