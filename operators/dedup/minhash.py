"""MinHash signatures for a batch of documents, vectorised in numpy.

The signatures are datasketch's: the same permutations (`permutations`: the draws of datasketch
2.0.0's `MinHash(num_perm, seed, scheme)`) applied the same way, so `signatures(texts)[i]` equals
`MinHash(num_perm, seed, scheme, hashfunc=self.hashfunc)` updated with `self.shingles(texts[i])`.
Only the per-shingle hash differs between the two modes, and it is explicit:

- ``hash="sha1"``: datasketch's default `sha1_hash32` (low 32 bits of SHA-1) per shingle;
  signatures are bit-equal to a default `MinHash(num_perm=128, seed=1)`. SHA-1 per shingle costs
  ~0.4 us in Python and bounds this mode (see docs/bench_dedup.md).
- ``hash="fast"`` (default): the whole batch is tokenised and hashed in numpy over its code points
  (a token's hash is a polynomial of its code points mod 2^64, read off prefix sums), and a shingle's
  hash is a polynomial of its token hashes mixed by the MurmurHash3 64-bit finaliser. `fast_shingle_hash32` is the same function for
  one shingle, so it can be handed to datasketch as `hashfunc` and the signatures are again equal.
  bench/dedup.py shows it gives the same recall on the planted pairs.

Shingles are `ngram` consecutive tokens (text.tokens: words, or single CJK characters) joined by a
space; a document with fewer tokens than `ngram` is one shingle of all its tokens; an empty
document has no shingles and its signature is all 2^32-1 (datasketch's empty MinHash).
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import numpy as np

from operators.dedup.text import CJK_RANGES, tokens

_M64 = (1 << 64) - 1
_POLY = 0x9E3779B97F4A7C15  # odd 64-bit multiplier (golden ratio) for the shingle polynomial
_TOK = 0x100000001B3  # FNV-1a 64-bit prime: the code-point polynomial of a token
_TOK_INV = pow(_TOK, -1, 1 << 64)  # odd, so invertible mod 2^64: lets prefix sums give any span's hash
_PIECE_CHARS = 1 << 16  # code points tokenised at once: the uint64 work arrays (512 KiB) stay in L2 cache
_TABLE_SIZE = 0x30000  # code points classified by table (BMP + planes 1-2); above: one by one
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)
_EMPTY = np.uint32(0xFFFFFFFF)
_WORD_RUNS = re.compile(r"[^\W_]+")
_CHUNK_SHINGLES = 4096  # columns of the (num_perm x shingles) work matrix: 128 x 4096 x 4 B = 2 MiB, cache-sized


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 64-bit finaliser (a bijection that spreads every input bit), on uint64 arrays."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 32-bit finaliser, as datasketch's affine32 scheme applies it before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def token_hash(token: str) -> int:
    """sum(ord(c_j) * _TOK^(len-1-j)) mod 2^64: what token_hashes computes for every token at once."""
    h = 0
    for ch in token:
        h = (h * _TOK + ord(ch)) & _M64
    return h


def fast_shingle_hash32(shingle: bytes) -> int:
    """The "fast" hash of one shingle (tokens joined by a space); a datasketch `hashfunc`."""
    h = 0
    for tok in shingle.decode("utf-8").split(" "):
        h = (h * _POLY + token_hash(tok)) & _M64
    return int(fmix64(np.array([h], dtype=np.uint64))[0] >> np.uint64(32))


class TokenHasher:
    """The vectorised tokeniser: code-point class tables and power tables, built once per hasher.

    Tokens: runs of `word_runs` code points outside `cjk_ranges`, and each code point in them alone (a
    word char only, unless `any_cjk`). Defaults: text.tokens' (str.isalnum runs, CJK and Hangul alone)."""

    def __init__(self, word_runs: re.Pattern = _WORD_RUNS, cjk_ranges=CJK_RANGES, any_cjk: bool = False):
        # (word, cjk) boolean tables by code point: by default word = str.isalnum, i.e. regex \w without "_"
        # (Python's re defines \w by isalnum); matched as runs: ~10 ms, 4x faster than isalnum per code point
        self.word_runs, self.any_cjk = word_runs, any_cjk
        self.word = np.zeros(_TABLE_SIZE, dtype=bool)
        for m in word_runs.finditer("".join(map(chr, range(_TABLE_SIZE)))):
            self.word[m.start() : m.end()] = True
        self.cjk = np.zeros(_TABLE_SIZE, dtype=bool)
        for lo, hi in cjk_ranges:
            self.cjk[lo : hi + 1] = True
        self._p = self._q = np.zeros(0, dtype=np.uint64)

    def powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(_TOK^j, _TOK_INV^j) mod 2^64 for j < n, grown by doubling and kept."""
        if len(self._p) < n:
            size = 1 << max(16, (n - 1).bit_length())
            self._p, self._q = _pow_table(_TOK, size), _pow_table(_TOK_INV, size)
        return self._p, self._q

    def token_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint64 hash of every token of the batch, doc after doc; int64 token count per doc).

        Same tokens as text.tokens (lowercase; runs of alphanumeric code points; each CJK character alone),
        found with array operations over the UTF-32 code points of the joined batch."""
        low = [t.lower() for t in texts]
        lens = np.fromiter(map(len, low), dtype=np.int64, count=len(low))
        cp = np.frombuffer("\n".join(low).encode("utf-32-le"), dtype=np.uint32)
        if len(cp) == 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(len(texts), dtype=np.int64)
        idx = np.minimum(cp, _TABLE_SIZE - 1)
        word = self.word[idx]
        high = cp >= _TABLE_SIZE
        if high.any():  # planes 3+ (rare): classify their few distinct code points one by one
            distinct = np.unique(cp[high])
            alnum = np.array([self.word_runs.fullmatch(chr(c)) is not None for c in distinct.tolist()], dtype=bool)
            word[high] = alnum[np.searchsorted(distinct, cp[high])]
        in_cjk = self.cjk[idx]
        cjk = in_cjk if self.any_cjk else in_cjk & word
        plain = word & ~in_cjk
        prev = np.concatenate([[False], plain[:-1]])
        nxt = np.concatenate([plain[1:], [False]])
        starts = np.flatnonzero((plain & ~prev) | cjk)
        ends = np.flatnonzero((plain & ~nxt) | cjk) + 1
        p_pow, q_pow = self.powers(len(cp) + 1)
        with np.errstate(over="ignore"):
            pref = np.zeros(len(cp) + 1, dtype=np.uint64)
            np.cumsum(cp.astype(np.uint64) * q_pow[: len(cp)], out=pref[1:])
            th = (pref[ends] - pref[starts]) * p_pow[ends - 1]
        doc_starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
        doc = np.searchsorted(doc_starts, starts, side="right") - 1
        return th, np.bincount(doc, minlength=len(texts)).astype(np.int64)


def _pow_table(base: int, size: int) -> np.ndarray:
    out = np.empty(size, dtype=np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        out[1:] = np.cumprod(np.full(size - 1, base, dtype=np.uint64))
    return out


def token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`TokenHasher().token_hashes(texts)` (a hasher built for one call; keep one to call many times)."""
    return TokenHasher().token_hashes(texts)


def sha1_hash32(shingle: bytes) -> int:
    """datasketch.hashfunc.sha1_hash32: the low 32 bits (little-endian) of SHA-1."""
    return int.from_bytes(hashlib.sha1(shingle).digest()[:4], "little")


def doc_pieces(texts: list[str], max_chars: int = _PIECE_CHARS) -> list[list[str]]:
    """Consecutive runs of documents of about max_chars code points (at least one document each)."""
    out, cur, size = [], [], 0
    for t in texts:
        if cur and size + len(t) > max_chars:
            out.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += len(t)
    if cur:
        out.append(cur)
    return out


def permutations(num_perm: int, seed: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of datasketch's permutations h -> a*h + b, drawn as `MinHash._init_permutations` draws them
    (datasketch 2.0.0; tests/test_dedup.py checks the signatures against datasketch's own), without
    importing datasketch: its package imports scipy, ~0.4 s in every process that hashes."""
    gen = np.random.RandomState(seed)
    if scheme == "legacy":  # (a, b) pairs below the Mersenne prime 2^61 - 1, a >= 1
        pairs = [(gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
                 for _ in range(num_perm)]
        a, b = np.array(pairs, dtype=np.uint64).T
        return a, b
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)  # odd: a bijection mod 2^32
    return a, gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)


class MinHasher:
    """Signatures of many documents at once; see the module docstring for the two hash modes."""

    def __init__(
        self,
        num_perm: int = 128,
        seed: int = 1,
        ngram: int = 5,
        hash: Literal["fast", "sha1"] = "fast",
        scheme: Literal["affine32", "legacy"] = "affine32",
    ):
        if hash not in ("fast", "sha1") or scheme not in ("affine32", "legacy"):
            raise ValueError(f"unknown hash {hash!r} or scheme {scheme!r}")
        self.num_perm, self.seed, self.ngram, self.hash, self.scheme = num_perm, seed, ngram, hash, scheme
        self._a, self._b = permutations(num_perm, seed, scheme)
        self.hashfunc = fast_shingle_hash32 if hash == "fast" else sha1_hash32
        self.tokens = TokenHasher()  # its tables are built once and shared with exact hashing

    def datasketch(self):
        """An empty datasketch MinHash that produces the same signatures as this hasher."""
        from datasketch import MinHash  # imports scipy (~0.4 s): only the tests and benches compare with it

        return MinHash(num_perm=self.num_perm, seed=self.seed, scheme=self.scheme, hashfunc=self.hashfunc)

    def shingles(self, text: str) -> list[bytes]:
        """The shingles of one document, as bytes (what datasketch's `update` is fed)."""
        toks = tokens(text)
        n = self.ngram
        if 0 < len(toks) < n:
            return [" ".join(toks).encode("utf-8")]
        return [" ".join(toks[i : i + n]).encode("utf-8") for i in range(len(toks) - n + 1)]

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 [len(texts), num_perm] signatures, bool [len(texts)] "has at least one shingle")."""
        sigs, oks = [], []
        for piece in doc_pieces(texts):
            hashes, counts = self._shingle_hashes(piece)
            sigs.append(self._permute_min(hashes, counts))
            oks.append(counts > 0)
        if not sigs:
            return np.zeros((0, self.num_perm), dtype=np.uint32), np.zeros(0, dtype=bool)
        return np.concatenate(sigs), np.concatenate(oks)

    # -- shingle hashes ------------------------------------------------------------------------
    def _shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All shingle hashes of the batch, concatenated doc after doc (uint64 < 2^32), and per-doc counts."""
        if self.hash == "sha1":
            counts, digests = np.zeros(len(texts), dtype=np.int64), []
            sha1 = hashlib.sha1
            for i, text in enumerate(texts):
                sh = self.shingles(text)
                counts[i] = len(sh)
                digests.extend([sha1(s).digest()[:4] for s in sh])
            flat = np.frombuffer(b"".join(digests), dtype="<u4").astype(np.uint64)
            return flat, counts
        return self._fast_hashes(texts)

    def signatures_of_tokens(self, th: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`signatures` of one batch from its `TokenHasher.token_hashes` (hash: fast), for a caller that has
        them already (dedup's keys hash the same tokens for exact dedup)."""
        hashes, counts = self._hashes_of_tokens(th, lens)
        return self._permute_min(hashes, counts), counts > 0

    def _fast_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self._hashes_of_tokens(*self.tokens.token_hashes(texts))

    def _hashes_of_tokens(self, th: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.ngram
        counts = np.where(lens >= n, lens - n + 1, np.minimum(lens, 1))
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        out = np.empty(int(counts.sum()), dtype=np.uint64)
        with np.errstate(over="ignore"):
            full = lens >= n
            if full.any():
                # Horner over the n token hashes of every window of the whole batch at once
                poly = th[: len(th) - n + 1].copy()
                for j in range(1, n):
                    poly *= np.uint64(_POLY)
                    poly += th[j : len(th) - n + 1 + j]
                fc, fs = counts[full], starts[full]
                # positions of the windows that lie inside one document
                pos = np.arange(int(fc.sum()), dtype=np.int64)
                pos += np.repeat(fs - (np.cumsum(fc) - fc), fc)
                out[np.repeat(full, counts)] = fmix64(poly[pos]) >> np.uint64(32)
            offsets = np.cumsum(counts) - counts
            for i in np.flatnonzero((lens > 0) & (lens < n)):  # short documents: one shingle of all tokens
                h = 0
                for t in th[starts[i] : starts[i] + lens[i]]:
                    h = (h * _POLY + int(t)) & _M64
                out[offsets[i]] = int(fmix64(np.array([h], dtype=np.uint64))[0] >> np.uint64(32))
        return out, counts

    # -- permutations and per-document minimum -------------------------------------------------
    def _permute_min(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        sig = np.full((len(counts), self.num_perm), _EMPTY, dtype=np.uint32)
        docs = np.flatnonzero(counts > 0)
        if len(docs) == 0:
            return sig
        c = counts[docs]
        ends = np.cumsum(c)
        hv = _fmix32(hashes.astype(np.uint32)) if self.scheme == "affine32" else hashes
        a, b = self._a[:, None], self._b[:, None]
        # permutations x shingles: each permutation is one contiguous row, and the per-document
        # minimum is a reduceat along it (4x faster than shingles x permutations in numpy)
        buf = np.empty((self.num_perm, min(_CHUNK_SHINGLES, len(hv)) + int(c.max())), dtype=self._a.dtype)
        lo_doc = 0
        with np.errstate(over="ignore"):
            while lo_doc < len(docs):
                lo = int(ends[lo_doc] - c[lo_doc])
                # as many whole documents as fit the chunk (at least one)
                hi_doc = max(lo_doc + 1, int(np.searchsorted(ends, lo + _CHUNK_SHINGLES, side="right")))
                hi = int(ends[hi_doc - 1])
                work = buf[:, : hi - lo]
                np.multiply(a, hv[None, lo:hi], out=work)
                work += b
                if self.scheme == "legacy":  # datasketch: (a*h + b) % (2^61 - 1) & (2^32 - 1), uint64 wraps
                    np.remainder(work, _MERSENNE, out=work)
                    np.bitwise_and(work, _MAX32, out=work)
                seg = (ends[lo_doc:hi_doc] - c[lo_doc:hi_doc]) - lo
                sig[docs[lo_doc:hi_doc]] = np.minimum.reduceat(work, seg, axis=1).T
                lo_doc = hi_doc
        return sig
