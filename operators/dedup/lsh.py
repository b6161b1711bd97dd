"""LSH banding for MinHash signatures: parameters as datasketch chooses them, and band keys.

A pair with Jaccard s shares at least one of b bands of r rows with probability 1 - (1 - s^r)^b
(Leskovec, Rajaraman, Ullman, Mining of Massive Datasets, ch. 3.4). `optimal_param` picks (b, r)
with b*r <= num_perm minimising the weighted areas of false positives below the threshold and false
negatives above it, as `datasketch.lsh._optimal_param` does (the same integrals; datasketch
integrates with scipy's quad, here Gauss-Legendre quadrature, exact for these polynomials and
without scipy's ~0.4 s import on the driver; tests/test_dedup.py checks both choose the same).
"""

from __future__ import annotations

import numpy as np

from operators.dedup.minhash import fmix64

_PRIME64 = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: multiplies in each row of a band


def optimal_param(
    threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) minimising fp_weight * FP area + fn_weight * FN area; datasketch's rule."""
    b, r = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64).T
    # P(candidate | s) = 1 - (1 - s^r)^b has degree r*b <= num_perm: n Gauss-Legendre nodes integrate
    # polynomials of degree <= 2n - 1 exactly
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def area(lo: float, hi: float, below: bool) -> np.ndarray:
        s = (hi - lo) / 2 * x[None, :] + (hi + lo) / 2
        p = 1 - (1 - s ** r[:, None]) ** b[:, None]
        return (hi - lo) / 2 * ((p if below else 1 - p) @ w)

    err = area(0.0, threshold, True) * false_positive_weight + area(threshold, 1.0, False) * false_negative_weight
    i = int(np.argmin(err))  # the first minimum in datasketch's (b, r) order, as its strict `<` keeps
    return int(b[i]), int(r[i])


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """int64 [n, bands]: a 64-bit hash of each band's `rows` values, salted by the band index.

    Two documents land in the same bucket of band i when the key matches; a 64-bit key collides by
    chance with probability ~n^2/2^65 per band, and every candidate is verified afterwards anyway."""
    n = sig.shape[0]
    out = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(bands):
            h = np.full(n, np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
            for j in range(i * rows, (i + 1) * rows):
                h ^= sig[:, j].astype(np.uint64)
                h *= _PRIME64
            out[:, i] = fmix64(h)
    return out.view(np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise share of equal signature values: the MinHash estimate of Jaccard similarity."""
    return (sig_a == sig_b).mean(axis=-1)
