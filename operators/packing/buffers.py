"""Steps 2 and 3, Search and Pack (InternVL 2.5 §4.2), over sorted lists of open buffers.

Two-budget search. Every open buffer is one int in a sorted Python list:

    key = ((remaining_tokens << TILE_BITS) | remaining_tiles) << ID_BITS | buffer_id

so `bisect_left(keys, ((tokens << TILE_BITS) | tiles) << ID_BITS)` lands, in O(log n), on the buffer
with the least remaining token room that still holds the sample (= the longest combined length)
and, among buffers with that room, the fewest remaining tiles >= the sample's (= the most tiles):
the paper's "longest length, then most tiles". Only the tile budget can still fail there, and we
step right past such buffers. Measured on the bench workload, 2/3 of those steps were over buffers
with no tile room left at all (a buffer reaches 48 tiles = 12,288 tokens with token room to spare,
and sits exactly where image samples' searches land), so those buffers live in a second sorted list
that only text samples search (two bisections, keep the better). That leaves ~0.8 steps per
sample, over buffers with 1-3 tiles left. One sorted list per remaining-tile count would need up to
49 bisections on every image sample to save those few steps. Inserting and deleting in a list of
ints is a memmove in C: at the buffer sizes used (<= a few thousand) faster than any tree in Python.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

from operators.packing.sample import Pack, Record


class BufferList:
    """The open buffers, sorted by remaining room, plus a reserve of small text-only samples.

    Both lists end in a sentinel key (room max_tokens + 1, every tile bit set) that every search
    can land on and that means "open a new buffer": the hot loop needs no bounds checks."""

    def __init__(self, max_tokens: int, max_tiles: int, capacity: int, reserve_size: int, reserve_max_tokens: int):
        self.max_tokens, self.max_tiles, self.capacity = max_tokens, max_tiles, capacity
        self.tile_bits = max(1, max_tiles.bit_length())
        self.id_bits = (capacity + 2).bit_length()
        self.sentinel = (((max_tokens + 1) << self.tile_bits) | ((1 << self.tile_bits) - 1)) << self.id_bits
        self.keys: list[int] = [self.sentinel]  # buffers with tile room left
        self.text_keys: list[int] = [self.sentinel]  # buffers at the tile budget: only text can join
        self.open = 0  # open buffers (sentinels excluded)
        self.contents: list[list[Record] | None] = [None] * (capacity + 2)  # by buffer id
        self.free_ids = list(range(capacity + 1, -1, -1))
        # Reserve: small text-only samples held back to top off a buffer at the moment it leaves
        # (they cost no tiles, so they can never break the tile budget): their token counts sorted,
        # and the records in the same order.
        self.reserve_size, self.reserve_max_tokens = reserve_size, reserve_max_tokens
        self.reserve_tokens: list[int] = []
        self.reserve: list[Record] = []
        self.probes = 0  # tile-infeasible buffers stepped over (reported by the benchmark)

    def __len__(self) -> int:
        return self.open

    def find_buffer(self, tokens: int, tiles: int) -> tuple[list[int], int]:
        """(list, index) of the best-fitting buffer for (tokens, tiles); the index of a sentinel
        when no open buffer can take it."""
        keys, ib, tb = self.keys, self.id_bits, self.tile_bits
        probe = ((tokens << tb) | tiles) << ib
        i = bisect_left(keys, probe)
        if tiles:
            mask = (1 << tb) - 1
            while (keys[i] >> ib) & mask < tiles:
                i += 1
                self.probes += 1
            return keys, i
        tk = self.text_keys
        j = bisect_left(tk, probe)
        if tk[j] >> (ib + tb) <= keys[i] >> (ib + tb):
            return tk, j  # equal room: the tile-full buffer has more tiles
        return keys, i

    def pack_into(self, where: tuple[list[int], int], rec: Record) -> tuple[int, int, int]:
        """Append `rec` to the buffer found by `find_buffer` (a new buffer at a sentinel); the buffer
        leaves its list and (remaining tokens, remaining tiles, buffer id) goes to `maintain`."""
        keys, index = where
        if keys[index] == self.sentinel:
            bid = self.free_ids.pop()
            self.contents[bid] = [rec]
            self.open += 1
            return self.max_tokens - rec.tokens, self.max_tiles - rec.tiles, bid
        key = keys.pop(index)
        bid = key & ((1 << self.id_bits) - 1)
        self.contents[bid].append(rec)
        room = key >> self.id_bits
        return (room >> self.tile_bits) - rec.tokens, (room & ((1 << self.tile_bits) - 1)) - rec.tiles, bid

    def put_back(self, rem_tokens: int, rem_tiles: int, bid: int) -> None:
        insort(self.keys if rem_tiles else self.text_keys, (((rem_tokens << self.tile_bits) | rem_tiles) << self.id_bits) | bid)

    def close(self, rem_tokens: int, rem_tiles: int, bid: int) -> Pack:
        """Turn a buffer that left the lists into a Pack, topping it off from the reserve first."""
        recs = self.contents[bid]
        self.contents[bid] = None
        self.free_ids.append(bid)
        self.open -= 1
        rt = self.reserve_tokens
        while rt:  # top off: the largest held sample that fits, repeatedly (inlined: hot at eviction)
            j = bisect_right(rt, rem_tokens) - 1
            if j < 0:
                break
            rem_tokens -= rt.pop(j)
            recs.append(self.reserve.pop(j))
        return Pack(self.max_tokens - rem_tokens, self.max_tiles - rem_tiles, recs)

    def pop_fullest(self) -> Pack:
        """Remove the buffer with the least token room (evicted when the lists are over capacity)."""
        if not self.open:
            raise IndexError("no open buffer")
        keys, tk = self.keys, self.text_keys
        key = tk.pop(0) if tk[0] < keys[0] else keys.pop(0)
        room = key >> self.id_bits
        mask = (1 << self.tile_bits) - 1
        return self.close(room >> self.tile_bits, room & mask, key & ((1 << self.id_bits) - 1))

    # ---- the reserve of small text-only samples ----------------------------------------------

    def hold(self, rec: Record) -> Record | None:
        """Keep a small text-only sample back; returns the largest held one if the reserve overflows."""
        rt = self.reserve_tokens
        if len(rt) >= self.reserve_size and (not rt or rec[0] >= rt[-1]):
            return rec  # it would be the largest held: it comes straight back out
        i = bisect_right(rt, rec[0])
        rt.insert(i, rec[0])
        self.reserve.insert(i, rec)
        if len(rt) <= self.reserve_size:
            return None
        rt.pop()
        return self.reserve.pop()

    def take_largest(self) -> Record:
        self.reserve_tokens.pop()
        return self.reserve.pop()
