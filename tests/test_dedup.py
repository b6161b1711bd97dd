"""Dedup building blocks without Ray: signatures equal datasketch's, LSH parameters, components,
survivor rules, normalisation, exact hashes and image hashes."""

from __future__ import annotations

import glob
import gzip
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from operators.dedup import components as cc
from operators.dedup.exact import content_hash, content_hashes
from operators.dedup.image import band_values, hamming, near_pairs, phash
from operators.dedup.lsh import band_keys, estimated_jaccard, optimal_param
from operators.dedup.minhash import MinHasher, permutations, token_hash, token_hashes
from operators.dedup.text import normalize, tokens
from pipeline.schema import rows_to_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = Path(__file__).parent / "data" / "dedup_python_docs.jsonl.gz"


@pytest.fixture(scope="module")
def real_texts() -> list[str]:
    with gzip.open(DOCS, "rt", encoding="utf-8") as f:
        return ["\n\n".join(json.loads(line)["paragraphs"]) for line in f][:60]


EDGE_TEXTS = [
    "",
    "   ",
    "one two",  # fewer tokens than the n-gram: one shingle of all tokens
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",  # CJK: character shingles
    "Mixed 中文 and English, with punctuation!!! and    spaces\tand\nnewlines",
    "Ünïcödé wörds — and “quotes” – plus numbers 3.14159 and under_scores",
]


# -- signatures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hash_", ["sha1", "fast"])
@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_signatures_equal_datasketch(real_texts, hash_, scheme):
    hasher = MinHasher(num_perm=128, seed=1, ngram=5, hash=hash_, scheme=scheme)
    texts = real_texts[:20] + EDGE_TEXTS
    sig, has = hasher.signatures(texts)
    for i, text in enumerate(texts):
        m = hasher.datasketch()
        m.update_batch(hasher.shingles(text))
        assert np.array_equal(sig[i].astype(np.uint64), m.hashvalues.astype(np.uint64)), text[:40]
        assert has[i] == bool(hasher.shingles(text))
    assert has.tolist() == [True] * 20 + [False, False] + [True] * (len(EDGE_TEXTS) - 2)


def test_sha1_mode_is_datasketch_default_minhash(real_texts):
    """hash=sha1 reproduces a plain `MinHash(num_perm=128, seed=1)` (sha1_hash32, datasketch's default scheme)."""
    hasher = MinHasher(hash="sha1")
    sig, _ = hasher.signatures(real_texts[:10])
    for i, text in enumerate(real_texts[:10]):
        m = MinHash(num_perm=128, seed=1)
        for sh in hasher.shingles(text):
            m.update(sh)
        assert np.array_equal(sig[i], m.hashvalues)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), min_size=1, max_size=6))
def test_vectorised_tokens_equal_reference_tokeniser(texts):
    th, counts = token_hashes(texts)
    ref = [tokens(t) for t in texts]
    assert counts.tolist() == [len(r) for r in ref]
    assert th.tolist() == [token_hash(tok) for r in ref for tok in r]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("ab cd,.E\n中文"), max_size=40), min_size=1, max_size=5))
def test_fast_signatures_equal_datasketch_property(texts):
    hasher = MinHasher(num_perm=16, hash="fast")
    sig, _ = hasher.signatures(texts)
    for i, text in enumerate(texts):
        m = hasher.datasketch()
        m.update_batch(hasher.shingles(text))
        assert np.array_equal(sig[i], m.hashvalues)


def test_estimated_jaccard_tracks_true_jaccard(real_texts):
    hasher = MinHasher()
    text = real_texts[0]
    words = text.split(" ")
    edited = " ".join(w if k % 25 else "zzz" for k, w in enumerate(words))
    sig, _ = hasher.signatures([text, edited, real_texts[1]])
    a, b = set(hasher.shingles(text)), set(hasher.shingles(edited))
    true = len(a & b) / len(a | b)
    assert abs(estimated_jaccard(sig[0], sig[1]) - true) < 0.12
    assert estimated_jaccard(sig[0], sig[2]) < 0.1


# -- LSH -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "threshold,num_perm,fp,fn", [(0.7, 128, 0.5, 0.5), (0.7, 128, 0.2, 0.8), (0.8, 128, 0.5, 0.5), (0.5, 64, 0.5, 0.5)]
)
def test_lsh_params_equal_datasketch(threshold, num_perm, fp, fn):
    assert optimal_param(threshold, num_perm, fp, fn) == _optimal_param(threshold, num_perm, fp, fn)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.05, 0.95), st.sampled_from([2, 8, 32, 100, 128, 256]), st.floats(0.05, 0.95))
def test_lsh_params_equal_datasketch_property(threshold, num_perm, fp):
    """Gauss-Legendre (exact for these polynomials) picks what datasketch's scipy quad picks."""
    assert optimal_param(threshold, num_perm, fp, 1 - fp) == _optimal_param(threshold, num_perm, fp, 1 - fp)


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("num_perm,seed", [(2, 0), (128, 1), (256, 7)])
def test_permutations_equal_datasketch(scheme, num_perm, seed):
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=scheme).permutations
    ours_a, ours_b = permutations(num_perm, seed, scheme)
    assert np.array_equal(ours_a, np.asarray(a)) and np.array_equal(ours_b, np.asarray(b))
    assert ours_a.dtype == ours_b.dtype == (np.uint32 if scheme == "affine32" else np.uint64)


def test_band_keys_match_only_on_equal_bands():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**32, size=(3, 128), dtype=np.uint64).astype(np.uint32)
    sig[1, :7] = sig[0, :7]  # band 0 equal (7 rows per band), the rest differs
    keys = band_keys(sig, 18, 7)
    assert keys.shape == (3, 18) and keys.dtype == np.int64
    assert keys[0, 0] == keys[1, 0] and (keys[0, 1:] != keys[1, 1:]).all()
    same = np.tile(sig[2, :7], 18)[None, :]  # identical values in every band still give distinct keys per band
    assert len(set(band_keys(np.pad(same, ((0, 0), (0, 2))), 18, 7)[0].tolist())) == 18


# -- components and survivors --------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=60))
def test_star_rounds_equal_union_find(pairs):
    u, v = [f"n{a:02d}" for a, _ in pairs], [f"n{b:02d}" for _, b in pairs]
    ref = cc.union_find(u, v)
    got = cc.components_by_stars(pa.table({"u": pa.array(u, pa.string()), "v": pa.array(v, pa.string())}))
    labels = dict(zip(got.column("u").to_pylist(), got.column("v").to_pylist()))
    assert {x: labels.get(x, x) for x in ref} == ref
    assert all(lab < node for node, lab in labels.items())


def test_union_find_labels_with_smallest_id():
    labels = cc.union_find(["b", "d", "c", "x"], ["a", "c", "b", "y"])
    assert labels == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}


def test_bucket_star_edges_link_each_member_to_bucket_min():
    t = pa.table(
        {
            "band": pa.array([0, 0, 0, 1, 1, 2], pa.int32()),
            "key": pa.array([5, 5, 5, 9, 9, 5], pa.int64()),
            "id": ["c", "a", "b", "c", "d", "e"],
        }
    )
    edges = cc.bucket_star_edges(t)
    assert sorted(zip(edges.column("u").to_pylist(), edges.column("v").to_pylist())) == [("b", "a"), ("c", "a"), ("d", "c")]


def test_pick_survivors_lowest_id_and_highest_score():
    t = pa.table(
        {"group": ["g1", "g1", "g1", "g2", "g2"], "id": ["z", "b", "m", "q", "p"], "score": [9.0, 1.0, 9.0, float("nan"), None]}
    )
    lowest = dict(zip(*(cc.pick_survivors(t).column(c).to_pylist() for c in ("id", "survivor"))))
    assert lowest == {"b": "b", "m": "b", "z": "b", "p": "p", "q": "p"}
    best = dict(zip(*(cc.pick_survivors(t, "score").column(c).to_pylist() for c in ("id", "survivor"))))
    assert best == {"b": "m", "m": "m", "z": "m", "p": "p", "q": "p"}  # tie on 9.0 -> lowest id; NaN/null rank last


# -- normalisation and exact hashes --------------------------------------------------------------
def test_normalize_case_whitespace_punctuation():
    assert normalize("  Hello,\tWORLD!\n\nIt's  fine. ") == "hello world it s fine"
    assert normalize("foo_bar—baz") == "foo bar baz"
    assert tokens("天地 玄黄abc") == ["天", "地", "玄", "黄", "abc"]


def test_content_hash_ignores_case_and_spacing_but_not_images():
    base = content_hash("The quick brown fox.", [b"\x89PNG-a"])
    assert content_hash("the   QUICK brown\nfox", [b"\x89PNG-a"]) == base
    assert content_hash("The quick brown fox.", [b"\x89PNG-b"]) != base
    assert content_hash("The quick brown fox.") != base
    assert content_hash("The quick brown fox jumps.", [b"\x89PNG-a"]) != base


def test_content_hashes_over_all_turns():
    def row(rid, turns):
        return {"id": rid, "source": "s", "category": "", "conversations": turns, "images": [], "meta": "{}"}

    t = rows_to_table(
        [
            row("a", [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "Answer one."}]),
            row("b", [{"from": "human", "value": "q"}, {"from": "gpt", "value": "answer ONE"}]),
            row("c", [{"from": "human", "value": "Other?"}, {"from": "gpt", "value": "Answer one."}]),
        ]
    )
    h = content_hashes(t)
    assert h[0] == h[1] != h[2]


# -- images --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stamps() -> list[bytes]:
    files = sorted(p for p in glob.glob(str(ROOT / "data/sample/images/**/*.png"), recursive=True) if "broken" not in p)
    if len(files) < 10:
        pytest.skip("bundled sample images missing")
    return [Path(f).read_bytes() for f in files[:24]]


def _reencode(data: bytes, scale: float = 0.8, quality: int = 70) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGBA")
    flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
    flat.alpha_composite(im)
    buf = io.BytesIO()
    flat.convert("RGB").resize((int(im.width * scale), int(im.height * scale))).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_phash_survives_reencoding_and_separates_images(stamps):
    orig = np.array([phash(b) for b in stamps], dtype=np.uint64)
    again = np.array([phash(_reencode(b)) for b in stamps], dtype=np.uint64)
    assert (hamming(orig, again) <= 4).mean() >= 0.9
    i, j = np.triu_indices(len(orig), 1)
    assert hamming(orig[i], orig[j]).min() > 4


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.sets(st.integers(0, 63), max_size=6), st.integers(0, 6))
def test_hamming_bands_find_every_pair_within_distance(h, flips, d):
    a = np.array([h], dtype=np.uint64)
    b = a.copy()
    for bit in flips:
        b ^= np.uint64(1) << np.uint64(bit)
    if len(flips) <= d:
        assert (band_values(a, d) == band_values(b, d)).any()  # pigeonhole: some band is untouched
        assert len(near_pairs(np.concatenate([a, b]), d)[0]) == 1
    else:
        assert len(near_pairs(np.concatenate([a, b]), d)[0]) == 0


def test_hamming_counts_bits():
    assert hamming(np.array([0b1011], np.uint64), np.array([0], np.uint64)).tolist() == [3]
    assert hamming(np.array([2**64 - 1], np.uint64), np.array([0], np.uint64)).tolist() == [64]


def test_token_hash_is_polynomial_per_token():
    rnd = random.Random(0)
    words = ["".join(rnd.choice("abcdef") for _ in range(rnd.randrange(1, 9))) for _ in range(50)]
    th, counts = token_hashes([" ".join(words)])
    assert counts.tolist() == [50] and th.tolist() == [token_hash(w) for w in words]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), max_size=30), min_size=1, max_size=4))
def test_partitions_through_storage_keep_every_row_once(tmp_path_factory, writers):
    """Writers' rows cut into 7 hash partitions (empty ones included) come back per partition, all once."""
    from pipeline.exchange import read_part, union, write_parts

    folder = tmp_path_factory.mktemp("parts")
    schema = pa.schema([("w", pa.int64()), ("i", pa.int64()), ("p", pa.int64())])
    parts = []
    for w, ps in enumerate(writers):
        t = pa.table({"w": [w] * len(ps), "i": list(range(len(ps))), "p": ps}, schema=schema)
        parts.append(write_parts(t, np.array(ps, dtype=np.int64), 7, str(folder / f"{w}.parquet")))
    both = union(parts, 7)
    assert both.rows() == sum(map(len, writers))
    for p in range(7):
        got = read_part(both.slices(p), schema)
        assert set(got.column("p").to_pylist()) <= {p}
        want = sorted((w, i) for w, ps in enumerate(writers) for i, q in enumerate(ps) if q == p)
        assert sorted(zip(got.column("w").to_pylist(), got.column("i").to_pylist())) == want


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["", "   ", "Hello, world!", "the cat sat on the mat again and again",
                                 "图书馆 在 哪里", "a b c d e f g h", "ÉCOLE école"]), min_size=1, max_size=12),
       st.integers(1, 40))
def test_dedup_keys_tokenise_once_and_equal_the_separate_hashes(texts, piece_chars):
    """The keys hash each document's tokens once for exact and MinHash dedup: the same content hashes and
    signatures as computing them apart, documents that normalise to nothing included, across pieces."""
    import operators.dedup.minhash as mh
    from pipeline.curate_config import DedupConfig
    from pipeline.dedup_stage import KeyMaker

    rows = [{"id": f"r{i}", "source": "s", "category": "", "meta": "{}", "images": [],
             "conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": t[::-1]}]}
            for i, t in enumerate(texts)]
    table = rows_to_table(rows)
    keys = KeyMaker(DedupConfig())(table)
    hasher = MinHasher()
    all_texts = [f"{t}\n{t[::-1]}" for t in texts]
    want_sig, want_ok = hasher.signatures(all_texts)
    assert keys.column("ehash").to_pylist() == content_hashes(table)
    assert np.array_equal(np.frombuffer(b"".join(keys.column("sig").to_pylist()), np.uint32).reshape(len(texts), -1),
                          want_sig)
    assert keys.column("has_sh").to_pylist() == want_ok.tolist()
    old = mh.doc_pieces.__defaults__  # several pieces: the per-piece loop lines documents up with their images
    try:
        mh.doc_pieces.__defaults__ = (piece_chars,)
        assert KeyMaker(DedupConfig())(table).equals(keys)
    finally:
        mh.doc_pieces.__defaults__ = old
