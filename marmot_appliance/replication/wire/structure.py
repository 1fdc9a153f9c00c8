"""A walk over CBOR item headers that bounds a body's size in objects before cbor2 builds any.

cbor2 builds every item as a Python object (up to ~64 bytes each: an empty list), so a body's
memory is bounded by MAX_CBOR_ITEMS times 64 bytes whatever its compression ratio; without the
bound a 2 KB zstd frame of nulls or empty arrays became gigabytes of objects.
"""

from __future__ import annotations

from marmot_appliance.replication.wire.errors import CodecError

# Deepest legitimate nesting: body map -> rows -> row -> values/pk (4); leave some slack.
MAX_CBOR_DEPTH = 8
# Most CBOR data items (containers, keys and values each count one) in one body. Publishers
# cut batches to stay below it (replication/batching.py); docs/wire-format.md states it.
MAX_CBOR_ITEMS = 1 << 17


class StructureCheck:
    """Walks CBOR item headers without building anything: counts items, bounds nesting.

    Resumable: feed() takes the whole buffer so far each time (it grows as slices are
    decompressed) and goes as far as complete headers allow; finish() demands exactly one
    complete top-level item. Refuses what change batches never contain, before cbor2 could
    build it: tags, indefinite lengths, simple values other than false/true/null.
    """

    __slots__ = ("pos", "stack", "items", "max_items", "max_depth")

    def __init__(self, max_items: int = MAX_CBOR_ITEMS, max_depth: int = MAX_CBOR_DEPTH):
        self.pos = 0
        self.stack = [1]  # items still expected per open container; the root expects one
        self.items = 0
        self.max_items = max_items
        self.max_depth = max_depth

    def feed(self, data: bytes | bytearray) -> None:
        pos, stack, items, max_items = self.pos, self.stack, self.items, self.max_items
        end = len(data)
        try:
            while stack:
                if stack[-1] == 0:
                    stack.pop()
                    continue
                if pos >= end:
                    break
                initial = data[pos]
                major = initial >> 5
                info = initial & 0x1F
                if info < 24:
                    argument, size = info, 1
                elif info < 28:
                    size = 1 + (1 << (info - 24))
                    if pos + size > end:
                        break
                    argument = int.from_bytes(data[pos + 1 : pos + size], "big")
                else:
                    raise CodecError(f"CBOR item at byte {pos}: indefinite or reserved length (0x{initial:02x})")
                stack[-1] -= 1
                items += 1
                pos += size
                if major <= 1:
                    continue
                if major <= 3:
                    pos += argument
                    continue
                if major <= 5:
                    count = argument if major == 4 else 2 * argument
                    if items + count > max_items:
                        raise CodecError(f"CBOR body holds more than {max_items} items")
                    if count:
                        if len(stack) > self.max_depth:
                            raise CodecError(f"CBOR body nests deeper than {self.max_depth}")
                        stack.append(count)
                    continue
                if major == 6:
                    raise CodecError(f"CBOR tag {argument} at byte {pos - size}: change batches carry no tags")
                if not (20 <= info <= 22 or 25 <= info <= 27):
                    raise CodecError(f"CBOR simple value 0x{initial:02x} at byte {pos - size} is not allowed")
        finally:
            self.pos, self.items = pos, items

    def finish(self, data: bytes | bytearray) -> None:
        if self.stack or self.pos != len(data):
            if self.pos < len(data) and not self.stack:
                raise CodecError(f"{len(data) - self.pos} bytes after the CBOR body")
            raise CodecError("CBOR body is truncated")
