"""A compact map from 64-bit keys to unsigned ints, for the one entry per record that dedup needs.

A Python dict of ints costs about 120 bytes an entry (measured: 1M random 64-bit keys with int values
raised RSS by 122 MB), so 10M records held 1.2 GB. This table keeps the keys and values in two flat
arrays, open addressing with linear probing, at most 70% full: 12 bytes a slot, 17-34 bytes an entry
depending on where the count falls between two doublings (the table doubles, so while it grows the
old and the new arrays are both alive for a moment: 1.5x the new one).

The keys are blake2b digests, uniform in their low bits, so `key & mask` is the slot. Key 0 marks an
empty slot; a digest of 0 is stored as 1 (two digests share a key with probability 2**-64 anyway).
"""

from __future__ import annotations

from array import array

_LOAD = 0.7


class U64Table:
    def __init__(self, capacity: int = 1 << 10) -> None:
        self.size = 0
        self._allocate(capacity, "I")

    def _allocate(self, capacity: int, value_type: str) -> None:
        self.keys = array("Q", [0]) * capacity
        self.values = array(value_type, [0]) * capacity
        self.mask = capacity - 1
        self.limit = int(capacity * _LOAD)
        self.max_value = (1 << (8 * self.values.itemsize)) - 1

    def _slot(self, key: int) -> int:
        keys, mask = self.keys, self.mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key or k == 0:
                return i
            i = (i + 1) & mask

    def get(self, key: int) -> int | None:
        i = self._slot(key or 1)
        return self.values[i] if self.keys[i] else None

    def __contains__(self, key: int) -> bool:
        return bool(self.keys[self._slot(key or 1)])

    def __len__(self) -> int:
        return self.size

    def setdefault(self, key: int, value: int) -> int | None:
        """The value already stored for `key`, or None after storing `value` (like dict.setdefault,
        but None says it was new)."""
        key = key or 1
        keys, mask = self.keys, self.mask  # _slot inlined: this runs once per record
        i = key & mask
        k = keys[i]
        while k and k != key:
            i = (i + 1) & mask
            k = keys[i]
        if k:
            return self.values[i]
        if value > self.max_value:  # line numbers past 2**31 (a 4-byte value): widen to 8 bytes once
            self.values = array("Q", self.values)
            self.max_value = (1 << 64) - 1
        self.keys[i], self.values[i] = key, value
        self.size += 1
        if self.size > self.limit:
            self._grow()
        return None

    def add(self, key: int) -> None:
        self.setdefault(key, 0)

    def set(self, key: int, value: int) -> None:
        """Store `value` for `key`, new or not."""
        if self.setdefault(key, value) is not None:
            self.values[self._slot(key or 1)] = value

    def _grow(self) -> None:
        keys, values = self.keys, self.values
        self._allocate(2 * len(keys), values.typecode)
        new_keys, new_values, mask = self.keys, self.values, self.mask
        for k, v in zip(keys, values, strict=True):
            if k:
                i = k & mask
                while new_keys[i]:  # every key is new here: probe to the first empty slot
                    i = (i + 1) & mask
                new_keys[i], new_values[i] = k, v

    def nbytes(self) -> int:
        return len(self.keys) * (self.keys.itemsize + self.values.itemsize)
