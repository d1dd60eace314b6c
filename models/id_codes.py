"""Catalogue numbers of the ids in a table entry's neighbour list, without Python objects.

A table entry names its neighbours as a JSON array of item ids. Decoding it makes a Python string
per id and a dict lookup each: about 30 µs for 200 ids, once per entry a user stage ranks from,
which at live rates is as much as the ranking kernels themselves. ``IdCodes`` keeps the ids'
UTF-8 bytes and a hash table over them in arrays, so that a compiled kernel
(``kernels.json_id_codes``) maps the JSON bytes to numbers directly, each match checked byte for
byte. Anything it does not handle (escapes, other spacing, an id not yet in the catalogue)
falls back to the general decode, with the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.arrays import PackedStrings
from models.kernels import hash_ids, json_id_codes


class IdCodes:
    """Ids 0..n-1 of a catalogue (append-only), for ``codes_many``; extended from the catalogue's id
    list on each call. A cache: rebuilt from the ids, never pickled."""

    def __init__(self) -> None:
        self.ids = PackedStrings(str.encode)  # the ids' UTF-8 bytes, end to end
        self.h_key = np.zeros(2048, dtype=np.uint64)
        self.h_code = np.full(2048, -1, dtype=np.int64)

    def codes_many(self, docs: Sequence[bytes], ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The numbers (int32) of the ids in each JSON array of ``docs``, where ``ids`` is the
        catalogue now (id -> its position), in one compiled call (a ranked chunk's sources):
        (the codes of those decoded, end to end; per document its count, -1 where the general
        decode must decide)."""
        if len(ids) > self.ids.n:
            self._extend(ids)
        doc_off = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)), out=doc_off[1:])
        buf = np.frombuffer(b"".join(docs), dtype=np.uint8)
        p = self.ids
        out, cnt = json_id_codes(buf, doc_off, self.h_key, self.h_code, p.buf, p.off[: p.n + 1])
        return out, cnt

    def _extend(self, ids: Sequence[str]) -> None:
        first = self.ids.extend(ids)
        n = self.ids.n
        if 2 * n > len(self.h_key):  # at most half full: rebuild at twice the size
            size = len(self.h_key)
            while 2 * n > size:
                size *= 2
            self.h_key = np.zeros(size, dtype=np.uint64)
            self.h_code = np.full(size, -1, dtype=np.int64)
            first = 0
        hash_ids(self.h_key, self.h_code, self.ids.buf, self.ids.off[: n + 1], first)
