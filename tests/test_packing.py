"""The packer: Select -> Search -> Pack -> Maintain (InternVL 2.5 §4.2), both modes, no Ray."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.packing import (
    BestFitPacker,
    Pack,
    Packer,
    Piece,
    Record,
    Unpackable,
    pack_stream,
    packed_row,
    select_samples,
    split_sample,
)
from operators.packing.format import packs_to_table

IMG_START, IMG_END, IMG_CTX = 9001, 9002, 9003


def ids_of(packs: list[Pack]) -> list[list]:
    return [[r.payload for r in p.records] for p in packs]


def run(packer: Packer, recs) -> list[Pack]:
    out = []
    for r in recs:
        out += packer.add(r)
    return out + packer.flush()


records = st.lists(
    st.tuples(st.integers(1, 1000), st.one_of(st.just(0), st.integers(0, 12))), min_size=0, max_size=300
).map(lambda xs: [Record(t, k, i) for i, (t, k) in enumerate(xs)])


@settings(max_examples=150, deadline=None)
@given(
    recs=records,
    mode=st.sampled_from(["ivl", "internvl"]),
    buffer_size=st.integers(1, 40),
    reserve=st.sampled_from([0, 1, 8, 64]),
    small=st.sampled_from([None, 200]),
    hold=st.sampled_from([0, 2, 128]),
)
def test_every_record_once_and_no_pack_over_budget(recs, mode, buffer_size, reserve, small, hold):
    kw = {"reserve_size": reserve, "reserve_max_tokens": small, "hold_packs": hold} if mode == "ivl" else {}
    packer = Packer(1000, 12, buffer_size=buffer_size, mode=mode, **kw)
    packs = run(packer, recs)
    seen = Counter(r.payload for p in packs for r in p.records)
    assert sorted(seen) == list(range(len(recs))) and set(seen.values()) <= {1}
    for p in packs:
        assert p.records, "empty pack"
        assert p.tokens == sum(r.tokens for r in p.records) <= 1000
        assert p.tiles == sum(r.tiles for r in p.records) <= 12
    # bounded memory: nothing is left inside after flush
    assert packer.flush() == []


@settings(max_examples=80, deadline=None)
@given(recs=records, buffer_size=st.integers(1, 40), reserve=st.sampled_from([0, 4, 64]), small=st.sampled_from([None, 200]))
def test_fused_loop_gives_the_same_packs_as_the_step_by_step_path(recs, buffer_size, reserve, small):
    kw = {"buffer_size": buffer_size, "reserve_size": reserve, "reserve_max_tokens": small, "hold_packs": 0}
    a, b, c = Packer(1000, 12, **kw), Packer(1000, 12, **kw), Packer(1000, 12, **kw)
    fused = a.add_many(recs) + a.flush()
    assert ids_of(fused) == ids_of(run(b, recs))
    assert [(p.tokens, p.tiles) for p in fused] == [(p.tokens, p.tiles) for p in run(c, recs)]


def test_search_takes_the_fullest_buffer_that_fits_both_budgets():
    # budgets 100 tokens / 10 tiles, no reserve: every step worked by hand.
    p = Packer(100, 10, buffer_size=10, reserve_size=0, hold_packs=0)  # the streaming policy itself
    A, B, C, D, E = (Record(60, 5, "A"), Record(70, 1, "B"), Record(25, 6, "C"), Record(35, 6, "D"), Record(35, 0, "E"))
    assert p.add(A) == [] and p.add(B) == []  # B does not fit A's buffer (130 tokens): a second buffer
    # C fits B's buffer (room 30, 9 tiles) and not A's (room 40 but 5 tiles): 95 tokens, 5 left < 25 -> out
    assert ids_of(p.add(C)) == [["B", "C"]]
    assert p.add(D) == []  # A's buffer has the room but not the tiles: a new buffer
    # E (text) fits A's buffer (room 40) and D's (room 65): best fit is A's -> 95 tokens -> out
    assert ids_of(p.add(E)) == [["A", "E"]]
    assert ids_of(p.flush()) == [["D"]]


def test_buffer_at_the_tile_budget_still_takes_text():
    p = Packer(100, 4, buffer_size=10, reserve_size=0, hold_packs=0)
    p.add(Record(50, 4, "A"))  # out of tiles, 50 tokens of room
    p.add(Record(40, 2, "B"))  # cannot join A (tiles): own buffer, 60 of room
    assert ids_of(p.add(Record(45, 0, "C"))) == [["A", "C"]]  # best fit: A's 50 of room -> 95 -> out
    assert ids_of(p.flush()) == [["B"]]


def test_fullest_buffer_is_evicted_over_capacity():
    p = Packer(100, 10, buffer_size=2, reserve_size=0, hold_packs=0)
    assert p.add(Record(70, 0, "A")) == [] and p.add(Record(50, 0, "B")) == []
    assert ids_of(p.add(Record(60, 0, "C"))) == [["A"]]  # three open, capacity 2: the fullest (A) leaves
    assert ids_of(p.flush()) == [["C"], ["B"]]  # flush: fullest first


def test_reserve_tops_off_a_pack_as_it_leaves():
    p = BestFitPacker(100, 10, buffer_size=1, reserve_size=4, reserve_max_tokens=20)
    assert p.add(Record(15, 0, "s1")) == [] and p.add(Record(9, 0, "s2")) == []  # small text: held
    assert p.add(Record(70, 1, "A")) == []
    # B does not fit A's buffer; over capacity A leaves, topped off with the best-fitting held samples
    assert ids_of(p.add(Record(50, 1, "B"))) == [["A", "s1", "s2"]]
    assert ids_of(p.flush()) == [["B"]]


def test_internvl_mode_reproduces_the_public_policy():
    """internvl_chat PackedDataset with max_packed_tokens=100, num_images_expected=10, max_buffer_size=2."""
    p = Packer(100, 10, mode="internvl", buffer_size=2)
    steps = [
        (Record(40, 3, "A"), []),  # list: [A(40,3)]
        (Record(50, 6, "B"), []),  # first fit A -> (90, 9)
        (Record(20, 1, "C"), []),  # (90,9)+C = 110 tokens: new buffer, after the 9-tile one
        (Record(10, 1, "D"), [["A", "B", "D"]]),  # first fit (90,9) -> exactly 100 tokens: yielded
        (Record(30, 5, "E"), []),  # joins C -> (50, 6)
        (Record(30, 0, "F"), []),  # joins -> (80, 6)
        (Record(60, 4, "G"), []),  # no fit: [(80,6), (60,4)]
        (Record(50, 0, "H"), [["C", "E", "F"]]),  # no fit: 3 buffers > 2: the head (most tiles) leaves
    ]
    for rec, expected in steps:
        assert ids_of(p.add(rec)) == expected, rec
    assert ids_of(p.flush()) == [["G"], ["H"]]


def test_internvl_mode_yields_the_head_at_the_tile_budget_and_is_first_fit():
    p = Packer(100, 10, mode="internvl", buffer_size=20)
    p.add(Record(10, 6, "A"))
    p.add(Record(80, 0, "B"))  # first fit: A's buffer (90, 6), though a new one would leave more room
    assert ids_of(p.add(Record(5, 4, "C"))) == [["A", "B", "C"]]  # 10 tiles at the head: yielded

    # First fit and best fit part ways: C fits both A's and B's buffer.
    recs = [Record(50, 1, "A"), Record(70, 1, "B"), Record(25, 1, "C")]
    first = Packer(100, 10, mode="internvl", buffer_size=20)
    assert ids_of(run(first, recs)) == [["A", "C"], ["B"]]  # the first in list order (A) takes C
    best = Packer(100, 10, buffer_size=20, reserve_size=0, hold_packs=0)
    assert ids_of(run(best, recs)) == [["B", "C"], ["A"]]  # the fullest that fits (B) takes C: 95 -> out


def test_records_over_a_budget_are_refused():
    with pytest.raises(ValueError):
        Packer(100, 10).add(Record(101, 0, "x"))
    with pytest.raises(ValueError):
        Packer(100, 10, mode="internvl").add(Record(10, 11, "x"))
    with pytest.raises(ValueError):
        Packer(mode="first-fit")


# ---- Select: mixing and splitting ------------------------------------------------------------------

def test_select_mixes_sources_by_weight_deterministically():
    a = [Record(10, 0, ("a", i)) for i in range(3000)]
    b = [Record(10, 0, ("b", i)) for i in range(1000)]
    first = list(select_samples([a, b], weights=[3, 1], seed=7))
    again = list(select_samples([a, b], weights=[3, 1], seed=7))
    other = list(select_samples([a, b], weights=[3, 1], seed=8))
    assert first == again and first != other
    assert Counter(r.payload[0] for r in first) == {"a": 3000, "b": 1000}  # each sample once
    head = Counter(r.payload[0] for r in first[:2000])
    assert 0.70 < head["a"] / 2000 < 0.80  # 3:1 while both last
    for src in "ab":  # each source keeps its own order
        idx = [r.payload[1] for r in first if r.payload[0] == src]
        assert idx == sorted(idx)


def make_sample(sid: str, layout: list, learn_every: int = 3) -> Piece:
    """layout: ints = text runs of that many tokens, ("img", tiles) = an image block."""
    ids, spans, tiles, k = [], [], [], 0
    for item in layout:
        if isinstance(item, tuple):
            spans.append((len(ids), len(ids) + 256 * item[1] + 2))
            ids += [IMG_START] + [IMG_CTX] * (256 * item[1]) + [IMG_END]
            tiles.append(item[1])
        else:
            ids += list(range(k, k + item))
            k += item
    ids = np.asarray(ids, np.int32)
    labels = np.where((np.arange(len(ids)) % learn_every == 0) & (ids < 9000), ids, -100).astype(np.int32)
    n = len(tiles)
    return Piece(sid, ids, labels, spans, tiles, [f"{sid}/{i}".encode() for i in range(n)], [12] * n, [True] * n)


layouts = st.lists(
    st.one_of(st.integers(1, 3000), st.tuples(st.just("img"), st.integers(1, 13))), min_size=1, max_size=8
)


@settings(max_examples=150, deadline=None)
@given(layout=layouts, max_tokens=st.integers(3500, 9000), max_tiles=st.integers(13, 30))
def test_split_pieces_fit_and_reassemble(layout, max_tokens, max_tiles):
    s = make_sample("s", layout)
    pieces = split_sample(s, max_tokens, max_tiles)
    assert np.array_equal(np.concatenate([p.input_ids for p in pieces]), s.input_ids)
    assert np.array_equal(np.concatenate([p.labels for p in pieces]), s.labels)  # each piece its own labels
    assert [b for p in pieces for b in p.images] == s.images
    assert [t for p in pieces for t in p.tiles_per_image] == s.tiles_per_image
    for p in pieces:
        assert p.tokens <= max_tokens and p.tiles <= max_tiles
        for a, b in p.image_spans:  # whole image blocks, never cut
            assert p.input_ids[a] == IMG_START and p.input_ids[b - 1] == IMG_END
        opened = np.cumsum(p.input_ids == IMG_START) - np.cumsum(p.input_ids == IMG_END)
        assert opened.min() >= 0 and opened[-1] == 0  # no piece starts or ends inside <img>..</img>
    if len(pieces) > 1:
        assert [p.sample_id for p in pieces] == [f"s#{k}" for k in range(len(pieces))]
        assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]


def test_an_image_block_over_the_budget_is_unpackable():
    s = make_sample("big", [10, ("img", 13), 10])  # 13 tiles = 3330 tokens
    with pytest.raises(Unpackable) as e:
        split_sample(s, 3000, 48)
    assert e.value.reason == "image_over_budget"
    rejected = []
    assert list(select_samples([[s]], max_tokens=3000, on_reject=lambda x, r: rejected.append((x.sample_id, r)))) == []
    assert rejected == [("big", "image_over_budget")]


# ---- the packed rows ---------------------------------------------------------------------------

def test_packed_rows_concatenate_samples_and_restart_positions():
    samples = [
        make_sample("t0", [400]),
        make_sample("long", [3000, ("img", 5), 2500, ("img", 7), 900]),  # over 4096: split
        make_sample("t1", [700, ("img", 2), 30]),
        make_sample("t2", [50]),
    ]
    by_id = {s.sample_id: s for s in samples}
    packs = list(pack_stream(select_samples([samples], max_tokens=4096, max_tiles=12), Packer(4096, 12, buffer_size=4)))
    rows = [packed_row(p) for p in packs]
    order = [sid for r in rows for sid in r["sample_ids"]]
    long_parts = [sid for sid in order if sid.startswith("long#")]
    assert long_parts == sorted(long_parts, key=lambda x: int(x.split("#")[1])) and len(long_parts) >= 2
    assert sorted(order) == sorted(["t0", "t1", "t2", *long_parts])
    pieces = {}
    for r in rows:
        cu = r["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == r["num_tokens"] == len(r["input_ids"]) == len(r["labels"]) <= 4096
        assert r["num_tiles"] == sum(r["tiles_per_image"]) <= 12
        assert len(r["images"]) == len(r["tiles_per_image"]) == len(r["image_max_tiles"]) == len(r["image_augment"])
        assert (r["input_ids"] == IMG_START).sum() == len(r["images"])
        for k, sid in enumerate(r["sample_ids"]):
            a, b = cu[k], cu[k + 1]
            assert np.array_equal(r["position_ids"][a:b], np.arange(b - a))  # restart at every boundary
            pieces[sid] = (r["input_ids"][a:b], r["labels"][a:b])
    for sid, s in by_id.items():
        parts = [pieces[x] for x in sorted((x for x in pieces if x == sid or x.startswith(sid + "#")),
                                           key=lambda x: int(x.split("#")[1]) if "#" in x else 0)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), s.input_ids)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), s.labels)
    table = packs_to_table(packs)
    assert table.num_rows == len(packs) and table.column("num_tokens").to_pylist() == [r["num_tokens"] for r in rows]


@settings(max_examples=60, deadline=None)
@given(
    layouts=st.lists(layouts, min_size=1, max_size=12),
    mode=st.sampled_from(["ivl", "internvl"]),
    buffer_size=st.integers(1, 8),
)
def test_stream_keeps_every_sample_and_its_pieces_in_order(layouts, mode, buffer_size):
    samples = [make_sample(f"s{k}", lay) for k, lay in enumerate(layouts)]
    rejected, dropped = [], []
    stream = select_samples([samples], max_tokens=5000, max_tiles=20, on_reject=lambda x, r: rejected.append((x, r)),
                            on_drop=dropped.append)
    packs = list(pack_stream(stream, Packer(5000, 20, buffer_size, mode)))
    rows = [packed_row(p) for p in packs]
    got: dict[str, list] = {}
    for r in rows:
        assert r["num_tokens"] <= 5000 and r["num_tiles"] <= 20
        assert (np.asarray(r["labels"]) != -100).any(), "a pack with no supervised token"
        cu = r["cu_seqlens"]
        for k, sid in enumerate(r["sample_ids"]):
            assert np.array_equal(r["position_ids"][cu[k] : cu[k + 1]], np.arange(cu[k + 1] - cu[k]))
            base, _, part = sid.partition("#")
            got.setdefault(base, []).append((int(part) if part else -1, r["input_ids"][cu[k] : cu[k + 1]]))
    # a sample with no supervised token is rejected whole; every other one is packed exactly once
    assert {x.sample_id for x, _ in rejected} == {s.sample_id for s in samples if (s.labels == -100).all()}
    assert {r for _, r in rejected} <= {"no_answer"}
    assert sorted(got) == sorted(s.sample_id for s in samples if (s.labels != -100).any())
    for p in dropped:  # dropped pieces: of split samples, and only those with nothing to learn
        assert p.part >= 0 and (p.labels == -100).all()
        got[p.sample_id.partition("#")[0]].append((p.part, p.input_ids))
    for s in samples:
        parts = sorted(got.get(s.sample_id, []), key=lambda x: x[0])
        if not parts:
            continue
        assert [p for p, _ in parts] == ([-1] if len(parts) == 1 else list(range(len(parts))))  # in order
        assert np.array_equal(np.concatenate([ids for _, ids in parts]), s.input_ids)
    order = [sid for r in rows for sid in r["sample_ids"]]
    for base in got:  # a split sample's packed pieces keep their order across packs
        ks = [int(x.partition("#")[2]) for x in order if x.startswith(base + "#")]
        assert ks == sorted(ks)


def test_a_piece_without_an_answer_is_dropped_and_the_one_before_it_ends_the_sample():
    # prompt, a long answer, then an image and a question with no answer: the last cut learns nothing
    s = make_sample("s", [2000, ("img", 6), 30])
    s.labels[: 2000 // 2] = -100  # a prompt, then the answer
    s.labels[2000:] = -100
    dropped = []
    pieces = list(select_samples([[s]], max_tokens=2500, max_tiles=48, on_drop=dropped.append))
    assert [p.sample_id for p in pieces] == ["s#0"] and pieces[0].last
    assert [p.sample_id for p in dropped] == ["s#1"] and dropped[0].tiles == 6
    assert list(select_samples([[s]], max_tokens=5000, max_tiles=48)) == [s]  # unsplit: kept whole
