"""A fixed-size set of piece indices, packed MSB-first (as BitTorrent's bitfield)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Bitfield:
    __slots__ = ("_bits", "_count", "size")

    def __init__(self, size: int, raw: bytes | None = None) -> None:
        if size < 0:
            raise ValueError("negative bitfield size")
        self.size = size
        nbytes = (size + 7) // 8
        if raw is None:
            self._bits = bytearray(nbytes)
        else:
            if len(raw) != nbytes:
                raise ValueError(f"bitfield of {size} bits needs {nbytes} bytes, got {len(raw)}")
            self._bits = bytearray(raw)
            if size % 8 and self._bits[-1] & (0xFF >> (size % 8)):
                raise ValueError("bitfield has bits set past its size")
        # kept current by add and discard: schedulers ask "complete?" on every event
        self._count = int.from_bytes(self._bits, "big").bit_count()

    @classmethod
    def full(cls, size: int) -> Bitfield:
        raw = bytearray(b"\xff" * ((size + 7) // 8))
        if size % 8:
            raw[-1] = (0xFF << (8 - size % 8)) & 0xFF  # no bits past the end
        return cls(size, bytes(raw))

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.size:
            return False
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def add(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(index)
        mask = 0x80 >> (index & 7)
        if not self._bits[index >> 3] & mask:
            self._bits[index >> 3] |= mask
            self._count += 1

    def discard(self, index: int) -> None:
        if index in self:
            self._bits[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF
            self._count -= 1

    def update(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.add(i)

    def union(self, other: Bitfield) -> Bitfield:
        if other.size != self.size:
            raise ValueError("bitfields of different sizes")
        return Bitfield(self.size, bytes(a | b for a, b in zip(self._bits, other._bits,
                                                                  strict=True)))

    def __iter__(self) -> Iterator[int]:
        # one big int makes this a walk over set bits only (fast for sparse and full fields)
        value = int.from_bytes(self._bits, "big")
        top = len(self._bits) * 8 - 1
        while value:
            high = value.bit_length() - 1  # MSB first: ascending piece indices
            yield top - high
            value ^= 1 << high

    def missing(self) -> list[int]:
        return [i for i in range(self.size) if i not in self]

    def count(self) -> int:
        return self._count

    def is_complete(self) -> bool:
        return self._count == self.size

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def copy(self) -> Bitfield:
        return Bitfield(self.size, bytes(self._bits))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and other.size == self.size and \
            other._bits == self._bits

    def __hash__(self) -> int:
        return hash((self.size, bytes(self._bits)))

    def __repr__(self) -> str:
        return f"Bitfield({self.count()}/{self.size})"
