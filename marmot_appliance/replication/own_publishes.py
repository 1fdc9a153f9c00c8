"""The stream sequences this process published, so its own consumer can skip them.

Filled by the publisher as JetStream acknowledges its messages, read by the consumer of the
same node; a small module of its own so neither has to import the other.
"""

from __future__ import annotations


class OwnPublishes:
    """Stream sequences this process published and JetStream acknowledged.

    The consumer of the same node can skip exactly these (their rows are already in the local
    database) without decoding them. Messages of our origin from an earlier lifetime are applied
    normally: after a snapshot restore they may hold rows the database no longer has.
    """

    # Bounded: a consumer that stopped (a gap, a blocked database) or jumped past them (a
    # restore) never takes its own sequences. Past the cap the lowest half is forgotten; a
    # forgotten one is merely decoded and applied like any message (its versions are already
    # recorded here, so it changes nothing), never lost.
    MAX_PER_STREAM = 65_536

    def __init__(self, max_per_stream: int = MAX_PER_STREAM) -> None:
        self._seqs: dict[str, set[int]] = {}
        self.max_per_stream = max_per_stream

    def add(self, stream: str, seq: int) -> None:
        seqs = self._seqs.setdefault(stream, set())
        seqs.add(seq)
        if len(seqs) > self.max_per_stream:
            self._seqs[stream] = set(sorted(seqs)[len(seqs) - self.max_per_stream // 2:])

    def tracked(self) -> int:
        return sum(len(seqs) for seqs in self._seqs.values())

    def take(self, stream: str, seq: int) -> bool:
        """True (and forget it) if `seq` on `stream` was published by this process."""
        seqs = self._seqs.get(stream)
        if not seqs or seq not in seqs:
            return False
        seqs.discard(seq)
        return True

    def take_range(self, stream: str, first: int, last: int) -> bool:
        """True (and forget them) if every sequence first..last was published by this process:
        a "gap" of only our own messages is no gap (their rows are in the database)."""
        seqs = self._seqs.get(stream)
        if not seqs or last - first + 1 > len(seqs) or any(s not in seqs for s in range(first, last + 1)):
            return False
        seqs.difference_update(range(first, last + 1))
        return True

    def forget_below(self, stream: str, seq: int) -> None:
        seqs = self._seqs.get(stream)
        if seqs:
            self._seqs[stream] = {s for s in seqs if s >= seq}
