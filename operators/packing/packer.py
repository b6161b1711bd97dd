"""Step 4, Maintain, and the packers built from the four steps (InternVL 2.5 §4.2).

`Packer(mode="ivl")` is this project's policy: best fit in a sorted list (buffers.py), packs leave
as soon as they cannot take the smallest sample seen, the fullest buffer is evicted when the list is
over capacity, and small text-only samples are held in a bounded reserve to top off each pack as it
leaves. `Packer(mode="internvl")` reproduces the public internvl_chat `PackedDataset` policy
(buffer list sorted by tiles, first fit, capacity 20, evict the head) for comparison.

Both work on `Record(tokens, tiles, payload)` and return `Pack(tokens, tiles, records)`; memory is
bounded by `buffer_size` open packs plus `reserve_size` small samples.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator
from itertools import chain

from operators.packing.buffers import BufferList
from operators.packing.repack import EXACT_NODES, is_nearly_full, pack_offline
from operators.packing.sample import Pack, Piece, Record

MODES = ("ivl", "internvl")
# Chosen from bench/packing.py (docs/bench_packing.md): 32 open packs and a reserve of 1024 small
# samples reach >= 99.9% token fill on the workload for seeds 0-3 (20 falls short on one);
# more buffers add memory and time, not fill.
DEFAULT_BUFFER_SIZE = 32
DEFAULT_RESERVE_SIZE = 1024
INTERNVL_BUFFER_SIZE = 20  # --max_buffer_size 20 in the InternVL 2.5 stage scripts
# A stream of up to 256 packs' worth is packed whole at its end (Packer): 8x the open buffers' memory,
# and enough for the bench's 500-2,000-sample partitions (47-75 packs each).
DEFAULT_HOLD_PACKS = 256  # 128 streamed the bench's 1,000-sample sets (136 packs): 138 where whole makes 136
HOLD_RECORDS = 4096  # and at most this many records: FFD's scan is O(records x packs)


def _check(rec: Record, max_tokens: int, max_tiles: int) -> None:
    if rec[0] > max_tokens or rec[1] > max_tiles or rec[0] <= 0 or rec[1] < 0:
        raise ValueError(f"record ({rec[0]} tokens, {rec[1]} tiles) is outside the budgets; select_samples splits first")


class BestFitPacker:
    """Best fit under both budgets with a bounded buffer list and a reserve of small samples."""

    def __init__(
        self,
        max_tokens: int = 16384,
        max_tiles: int = 48,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        reserve_size: int = DEFAULT_RESERVE_SIZE,
        reserve_max_tokens: int | None = None,
        min_tokens: int = 16,
    ):
        if buffer_size < 1 or reserve_size < 0:
            raise ValueError("buffer_size must be >= 1 and reserve_size >= 0")
        # Samples up to ~2.3% of the budget count as small (384 of 16384): they are frequent enough to
        # fill the last gap of most packs and small enough that holding them back barely delays them.
        reserve_max_tokens = max_tokens * 3 // 128 if reserve_max_tokens is None else reserve_max_tokens
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self._args = (max_tokens, max_tiles, buffer_size, reserve_size, reserve_max_tokens, min_tokens)
        self.buffers = BufferList(max_tokens, max_tiles, buffer_size, reserve_size, reserve_max_tokens)
        # A pack with less room than the smallest sample seen (at most `min_tokens`) cannot take more.
        self.full_below = min_tokens

    def add(self, rec: Record) -> list[Pack]:
        """Select -> Search -> Pack -> Maintain for one record, step by step (the reference path)."""
        out: list[Pack] = []
        tokens, tiles = rec[0], rec[1]
        if tokens > self.max_tokens or tiles > self.max_tiles or tokens <= 0:
            _check(rec, self.max_tokens, self.max_tiles)
        self.full_below = min(self.full_below, tokens)
        b = self.buffers
        if tiles == 0 and tokens <= b.reserve_max_tokens and b.reserve_size:
            rec = b.hold(rec)
            if rec is None:
                return out
            tokens, tiles = rec[0], rec[1]
        rem_tokens, rem_tiles, bid = b.pack_into(b.find_buffer(tokens, tiles), rec)
        self.maintain(rem_tokens, rem_tiles, bid, out)
        return out

    def add_many(self, recs: Iterable[Record]) -> list[Pack]:
        """`add` fused into one loop over many records: the same steps and the same packs
        (tests/test_packing.py checks this), without five Python calls per sample; this is the path
        the benchmark times."""
        out: list[Pack] = []
        b = self.buffers
        keys, text_keys, contents, free_ids = b.keys, b.text_keys, b.contents, b.free_ids
        res_tokens, res_recs, res_size = b.reserve_tokens, b.reserve, b.reserve_size
        tb, ib, cap, sentinel = b.tile_bits, b.id_bits, b.capacity, b.sentinel
        tib, tmask, imask = tb + ib, (1 << tb) - 1, (1 << ib) - 1
        max_tokens, max_tiles = self.max_tokens, self.max_tiles
        small = b.reserve_max_tokens if b.reserve_size else -1
        full_below, probes, n_open = self.full_below, 0, b.open
        for rec in recs:
            tokens, tiles, _ = rec
            if tokens > max_tokens or tiles > max_tiles or tokens <= 0:
                _check(rec, max_tokens, max_tiles)
            if tokens < full_below:
                full_below = self.full_below = tokens
            # Search (BufferList.find_buffer)
            if tiles:
                where = keys
                i = bisect_left(keys, ((tokens << tb) | tiles) << ib)
                while (keys[i] >> ib) & tmask < tiles:
                    i += 1
                    probes += 1
            else:
                # Held back in the reserve (BufferList.hold); when it is full the largest comes out,
                # which is this sample itself whenever it is not smaller than every held one.
                if tokens <= small and (len(res_tokens) < res_size or tokens < res_tokens[-1]):
                    j = bisect_right(res_tokens, tokens)
                    res_tokens.insert(j, tokens)
                    res_recs.insert(j, rec)
                    if len(res_tokens) <= res_size:
                        continue
                    tokens = res_tokens.pop()
                    rec = res_recs.pop()
                where, probe = keys, tokens << tib
                i, j = bisect_left(keys, probe), bisect_left(text_keys, probe)
                if text_keys[j] >> tib <= keys[i] >> tib:
                    where, i = text_keys, j
            # Pack (BufferList.pack_into)
            key = where[i]
            if key == sentinel:
                bid = free_ids.pop()
                contents[bid] = [rec]
                n_open += 1
                rem_tokens, rem_tiles = max_tokens - tokens, max_tiles - tiles
            else:
                del where[i]
                bid = key & imask
                contents[bid].append(rec)
                room = key >> ib
                rem_tokens, rem_tiles = (room >> tb) - tokens, (room & tmask) - tiles
            # Maintain (self.maintain)
            if rem_tokens < full_below:  # no sample seen is that small, so no top-off either
                recs_ = contents[bid]
                contents[bid] = None
                free_ids.append(bid)
                n_open -= 1
                out.append(Pack(max_tokens - rem_tokens, max_tiles - rem_tiles, recs_))
            else:
                insort(keys if rem_tiles else text_keys, (((rem_tokens << tb) | rem_tiles) << ib) | bid)
                if n_open > cap:
                    b.open = n_open
                    out.append(b.pop_fullest())
                    n_open -= 1
        b.probes += probes
        b.open = n_open
        return out

    def maintain(self, rem_tokens: int, rem_tiles: int, bid: int, out: list[Pack]) -> None:
        """Yield the buffer if it cannot take more, else put it back; evict the fullest if over capacity."""
        b = self.buffers
        if rem_tokens < self.full_below:
            out.append(b.close(rem_tokens, rem_tiles, bid))
            return
        b.put_back(rem_tokens, rem_tiles, bid)
        if b.open > b.capacity:
            out.append(b.pop_fullest())

    def drain(self) -> list[Record]:
        """Take every record still held (open buffers, fullest first, then the reserve) and empty the packer."""
        b = self.buffers
        ib = b.id_bits
        keys = sorted(k for k in (*b.keys, *b.text_keys) if k != b.sentinel)
        recs = [r for k in keys for r in b.contents[k & ((1 << ib) - 1)]]
        recs += b.reserve
        self.__init__(*self._args)
        return recs

    def finish(self) -> list[Pack]:
        """At the end: what is left repacked (repack.py: FFD, then search), not flushed half full."""
        return pack_offline(self.drain(), self.max_tokens, self.max_tiles)

    def flush(self) -> list[Pack]:
        """At the end: every open buffer leaves, fullest first (each topped off), then the reserve."""
        b = self.buffers
        out = [b.pop_fullest() for _ in range(b.open)]
        while b.reserve:  # what is left of the reserve: largest first, topped off by the rest
            first = b.take_largest()
            bid = b.free_ids.pop()
            b.contents[bid] = [first]
            b.open += 1
            out.append(b.close(self.max_tokens - first[0], self.max_tiles, bid))
        return out


class InternVLPacker:
    """The public internvl_chat policy (`PackedDataset.find_buffer` / `update_buffer_list`):
    buffers in a list sorted by tiles, most first; a sample goes into the first buffer where both
    budgets hold (linear scan); a buffer at exactly max tokens leaves, then buffers at the tile
    budget leave from the head, then the head leaves while the list is over capacity."""

    def __init__(self, max_tokens: int = 16384, max_tiles: int = 48, buffer_size: int = INTERNVL_BUFFER_SIZE):
        self.max_tokens, self.max_tiles, self.capacity = max_tokens, max_tiles, buffer_size
        self.buffers: list[list] = []  # [tokens, tiles, records]

    def add(self, rec: Record) -> list[Pack]:
        return self.add_many((rec,))

    def add_many(self, recs: Iterable[Record]) -> list[Pack]:
        out: list[Pack] = []
        bl, max_tokens, max_tiles, cap = self.buffers, self.max_tokens, self.max_tiles, self.capacity
        for rec in recs:
            tokens, tiles = rec[0], rec[1]
            if tokens > max_tokens or tiles > max_tiles or tokens <= 0:
                _check(rec, max_tokens, max_tiles)
            for j, buf in enumerate(bl):  # find_buffer: first fit in list order
                if buf[1] + tiles <= max_tiles and buf[0] + tokens <= max_tokens:
                    buf = bl.pop(j)
                    buf[0] += tokens
                    buf[1] += tiles
                    buf[2].append(rec)
                    break
            else:
                buf = [tokens, tiles, [rec]]
            if buf[0] >= max_tokens:  # buffer_max_len_list
                out.append(Pack(*buf))
            else:  # update_buffer_list: insert before the first buffer with fewer tiles
                at = len(bl)
                for j, other in enumerate(bl):
                    if other[1] < buf[1]:
                        at = j
                        break
                bl.insert(at, buf)
            while bl and bl[0][1] == max_tiles:
                out.append(Pack(*bl.pop(0)))
            while len(bl) > cap:
                out.append(Pack(*bl.pop(0)))
        return out

    def flush(self) -> list[Pack]:
        out = [Pack(*buf) for buf in self.buffers]
        self.buffers = []
        return out

    finish = flush  # the public policy has no end-of-stream repack


class Packer:
    """Streaming packer: `add(record) -> packs ready now`, `finish()` (or `flush()`) `-> the rest`.

    mode "ivl": best fit (this project). mode "internvl": the public InternVL code's policy. Packing
    is a pure function of the input order; randomness (the mix of sources) lives in `select_samples`.

    Mode "ivl" first holds records back while they add up to at most `hold_packs` packs' worth of
    either budget (and HOLD_RECORDS records): a stream that ends within that (a small dataset, a small partition) is packed
    whole by first-fit decreasing, or by the streaming packer if that makes fewer packs (the streaming
    packer cannot see what comes later: on 1,500 Tux Paint samples at 8,192 tokens / 24 tiles it made
    297 packs where FFD over the whole set made 293, with 290 samples of > 12 tiles that no two can
    share). A longer stream is fed, from its first record, to the streaming packer: the same packs as
    without holding, so memory stays bounded by `hold_packs` packs plus the buffers."""

    def __init__(
        self,
        max_tokens: int = 16384,
        max_tiles: int = 48,
        buffer_size: int | None = None,
        mode: str = "ivl",
        reserve_size: int = DEFAULT_RESERVE_SIZE,
        reserve_max_tokens: int | None = None,
        hold_packs: int = DEFAULT_HOLD_PACKS,
        exact_nodes: int = EXACT_NODES,
    ):
        if mode == "ivl":
            self.impl = BestFitPacker(
                max_tokens, max_tiles, buffer_size or DEFAULT_BUFFER_SIZE, reserve_size, reserve_max_tokens
            )
        elif mode == "internvl":
            self.impl = InternVLPacker(max_tokens, max_tiles, buffer_size or INTERNVL_BUFFER_SIZE)
        else:
            raise ValueError(f"unknown packing mode {mode!r}; known: {', '.join(MODES)}")
        self.mode, self.max_tokens, self.max_tiles = mode, max_tokens, max_tiles
        self.hold_packs = hold_packs if mode == "ivl" else 0
        self.exact_nodes = exact_nodes  # the end's exact search budget (repack.py); 0: FFD + local search only
        self._start_holding()

    def _start_holding(self) -> None:
        self.held: list[Record] | None = [] if self.hold_packs > 0 else None
        self.held_tokens = self.held_tiles = 0

    def _stop_holding(self, rest: Iterable[Record] = ()) -> list[Pack]:
        """Feed what is held (then `rest`) to the streaming packer; holding ends for this stream."""
        held, self.held = self.held or [], None
        return self.impl.add_many(chain(held, rest))

    def add(self, rec: Record) -> list[Pack]:
        return self.impl.add(rec) if self.held is None else self.add_many((rec,))

    def add_many(self, recs: Iterable[Record]) -> list[Pack]:
        """`add` over many records at once (the same result, less call overhead)."""
        if self.held is None:
            return self.impl.add_many(recs)
        it = iter(recs)
        for rec in it:
            if rec[0] > self.max_tokens or rec[1] > self.max_tiles or rec[0] <= 0:
                _check(rec, self.max_tokens, self.max_tiles)
            self.held.append(rec)
            self.held_tokens += rec[0]
            self.held_tiles += rec[1]
            if (self.held_tokens > self.hold_packs * self.max_tokens or self.held_tiles > self.hold_packs * self.max_tiles
                    or len(self.held) > HOLD_RECORDS):
                return self._stop_holding(it)
        return []

    def flush(self) -> list[Pack]:
        """Every open buffer as it is (the streaming policy's own end)."""
        out = self._stop_holding() if self.held is not None else []
        out += self.impl.flush()
        self._start_holding()
        return out

    def _cost(self, packs: list[Pack]) -> tuple[int, int]:
        """Fewer packs first, then fewer short of 99% of both budgets (those go on to a tail repack)."""
        return len(packs), sum(not is_nearly_full(p, self.max_tokens, self.max_tiles) for p in packs)

    def finish(self) -> list[Pack]:
        """The end of a stream: mode "ivl" packs a held stream whole (see the class docstring) or
        repacks what the streaming packer left (`pack_offline`); "internvl" flushes."""
        if self.held is None:
            out = self._finish_stream()
        else:
            held = self.held
            whole = pack_offline(held, self.max_tokens, self.max_tiles, self.exact_nodes)
            streamed = self._stop_holding() + self._finish_stream()
            out = min(streamed, whole, key=self._cost)  # the stream on a tie
        self._start_holding()
        return out

    def _finish_stream(self) -> list[Pack]:
        if self.mode != "ivl":
            return self.impl.finish()
        return pack_offline(self.impl.drain(), self.max_tokens, self.max_tiles, self.exact_nodes)


def pack_stream(samples: Iterable[Piece | Record], packer: Packer, finish: bool = True) -> Iterator[Pack]:
    """Drive a packer over a selected stream; yields every pack, those of `packer.finish()` last
    (with `finish=False` the caller takes what is left itself).

    A piece of a split sample that is not its last leaves alone as its own pack: the greedy cut made
    it as full as its image blocks allow, and emitting it at once keeps a sample's pieces in order."""
    for s in samples:
        rec = s.record() if isinstance(s, Piece) else s
        if isinstance(s, Piece) and not s.last:
            yield Pack(rec.tokens, rec.tiles, [rec])
            continue
        yield from packer.add(rec)
    if finish:
        yield from packer.finish()
