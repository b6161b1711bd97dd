"""MinHash signatures for a batch of documents, vectorised in numpy.

The signatures are datasketch's: the same permutations (taken from `datasketch.MinHash(num_perm,
seed, scheme)`) applied the same way, so `signatures(texts)[i]` equals
`MinHash(num_perm, seed, scheme, hashfunc=self.hashfunc)` updated with `self.shingles(texts[i])`.
Only the per-shingle hash differs between the two modes, and it is explicit:

- ``hash="sha1"``: datasketch's default `sha1_hash32` (low 32 bits of SHA-1) per shingle;
  signatures are bit-equal to a default `MinHash(num_perm=128, seed=1)`. SHA-1 per shingle costs
  ~0.4 us in Python and bounds this mode (see docs/bench_dedup.md).
- ``hash="fast"`` (default): each distinct token is hashed once (xxh3-64, cached), and a shingle's
  hash is a polynomial of its token hashes mixed by the MurmurHash3 64-bit finaliser, computed for
  all shingles of a batch in a few numpy passes. `fast_shingle_hash32` is the same function for
  one shingle, so it can be handed to datasketch as `hashfunc` and the signatures are again equal.
  bench/dedup.py shows it gives the same recall on the planted pairs.

Shingles are `ngram` consecutive tokens (text.tokens: words, or single CJK characters) joined by a
space; a document with fewer tokens than `ngram` is one shingle of all its tokens; an empty
document has no shingles and its signature is all 2^32-1 (datasketch's empty MinHash).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import xxhash
from datasketch import MinHash

from operators.dedup.text import tokens

_M64 = (1 << 64) - 1
_POLY = 0x9E3779B97F4A7C15  # odd 64-bit multiplier (golden ratio) for the token polynomial
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)
_EMPTY = np.uint32(0xFFFFFFFF)
_CHUNK_SHINGLES = 4096  # rows of the (shingles x num_perm) work matrix: 4096 x 128 x 4 B = 2 MiB, cache-sized


def _fmix64(h: np.ndarray) -> np.ndarray:
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


def _token_hash(token: str) -> int:
    return xxhash.xxh3_64_intdigest(token.encode("utf-8"))


def fast_shingle_hash32(shingle: bytes) -> int:
    """The "fast" hash of one shingle (tokens joined by a space); a datasketch `hashfunc`."""
    h = 0
    for tok in shingle.decode("utf-8").split(" "):
        h = (h * _POLY + _token_hash(tok)) & _M64
    return int(_fmix64(np.array([h], dtype=np.uint64))[0] >> np.uint64(32))


def sha1_hash32(shingle: bytes) -> int:
    """datasketch.hashfunc.sha1_hash32: the low 32 bits (little-endian) of SHA-1."""
    return int.from_bytes(hashlib.sha1(shingle).digest()[:4], "little")


class _TokenHashes(dict):
    """token -> xxh3-64, filled on first use; a dict so a batch's lookups run at C speed via map()."""

    def __missing__(self, token: str) -> int:
        h = self[token] = _token_hash(token)
        return h


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
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=scheme).permutations
        dtype = np.uint32 if scheme == "affine32" else np.uint64
        self._a, self._b = np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)
        self._cache = _TokenHashes()
        self.hashfunc = fast_shingle_hash32 if hash == "fast" else sha1_hash32

    def datasketch(self) -> MinHash:
        """An empty datasketch MinHash that produces the same signatures as this hasher."""
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
        hashes, counts = self._shingle_hashes(texts)
        return self._permute_min(hashes, counts), counts > 0

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

    def _fast_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        n = self.ngram
        toks_per_doc = [tokens(t) for t in texts]
        lens = np.fromiter(map(len, toks_per_doc), dtype=np.int64, count=len(texts))
        flat_tokens = [tok for toks in toks_per_doc for tok in toks]
        if len(self._cache) > 2_000_000:  # bound the cache; a corpus' hot vocabulary refills it fast
            self._cache.clear()
        th = np.fromiter(map(self._cache.__getitem__, flat_tokens), dtype=np.uint64, count=len(flat_tokens))
        counts = np.where(lens >= n, lens - n + 1, np.minimum(lens, 1))
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        out = np.empty(int(counts.sum()), dtype=np.uint64)
        with np.errstate(over="ignore"):
            full = lens >= n
            if full.any() and len(th) >= n:
                # Horner over the n token hashes of every window of the whole batch at once
                poly = th[: len(th) - n + 1].copy()
                for j in range(1, n):
                    poly *= np.uint64(_POLY)
                    poly += th[j : len(th) - n + 1 + j]
                fc, fs = counts[full], starts[full]
                # positions of the windows that lie inside one document
                pos = np.arange(int(fc.sum()), dtype=np.int64)
                pos += np.repeat(fs - (np.cumsum(fc) - fc), fc)
                dst = np.repeat(full, counts)
                out[dst] = _fmix64(poly[pos]) >> np.uint64(32)
            for i in np.flatnonzero((lens > 0) & (lens < n)):  # short documents: one shingle of all tokens
                h = 0
                for tok in toks_per_doc[i]:
                    h = (h * _POLY + self._cache[tok]) & _M64
                out[int(counts[:i].sum())] = int(_fmix64(np.array([h], dtype=np.uint64))[0] >> np.uint64(32))
        return out, counts

    # -- permutations and per-document minimum -------------------------------------------------
    def _permute_min(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        sig = np.full((len(counts), self.num_perm), _EMPTY, dtype=np.uint32)
        docs = np.flatnonzero(counts > 0)
        if len(docs) == 0:
            return sig
        c = counts[docs]
        ends = np.cumsum(c)
        if self.scheme == "affine32":
            hv = _fmix32(hashes.astype(np.uint32))
        else:
            hv = hashes
        buf = np.empty((min(_CHUNK_SHINGLES, len(hv)) + int(c.max()), self.num_perm), dtype=self._a.dtype)
        lo_doc = 0
        with np.errstate(over="ignore"):
            while lo_doc < len(docs):
                lo = int(ends[lo_doc] - c[lo_doc])
                # as many whole documents as fit the chunk (at least one)
                hi_doc = max(lo_doc + 1, int(np.searchsorted(ends, lo + _CHUNK_SHINGLES, side="right")))
                hi = int(ends[hi_doc - 1])
                work = buf[: hi - lo]
                np.multiply(hv[lo:hi, None], self._a, out=work)
                work += self._b
                if self.scheme == "legacy":  # datasketch: (a*h + b) % (2^61 - 1) & (2^32 - 1), uint64 wraps
                    np.remainder(work, _MERSENNE, out=work)
                    np.bitwise_and(work, _MAX32, out=work)
                seg = (ends[lo_doc:hi_doc] - c[lo_doc:hi_doc]) - lo
                sig[docs[lo_doc:hi_doc]] = np.minimum.reduceat(work, seg, axis=0)
                lo_doc = hi_doc
        return sig
