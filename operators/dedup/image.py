"""Perceptual hashes of images (64-bit DCT pHash) and Hamming banding for near-duplicate images.

pHash as in imagehash.phash (Zauner, "Implementation and Benchmarking of Perceptual Image Hash
Functions", 2010): grey, resize to 32x32, 2-D DCT-II, keep the 8x8 lowest frequencies, one bit per
coefficient: above their median. Re-encoding, resizing and mild colour changes flip only a few bits.
Banding: split the 64 bits into max_hamming + 1 bands; two hashes within max_hamming bits agree on at
least one band exactly (pigeonhole), so exact band matches give every candidate pair.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from operators.images import ImageError, ImageProblem, decode_image

_N, _K = 32, 8


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: row k is cos(pi (2i+1) k / 2n); scaling does not change the bits."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_N)
_BITS = np.uint64(1) << np.arange(64, dtype=np.uint64)[::-1]
_DCT.setflags(write=False)  # constant tables
_BITS.setflags(write=False)


def phash(data: bytes) -> int:
    """64-bit pHash of encoded image bytes (first frame); raises ImageError (operators/images.py's policy)."""
    with decode_image(data) as im:
        try:
            im = im.convert("RGBA")  # transparent pixels count as white, as when a PNG is flattened to JPEG
        except Exception as e:  # a mode PIL cannot convert (rare palette/CMYK corruptions)
            raise ImageError(ImageProblem.BROKEN_DATA, str(e) or type(e).__name__) from None
        flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
        flat.alpha_composite(im)
        grey = np.asarray(flat.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:_K, :_K]
    bits = (low > np.median(low)).ravel()
    return int(np.bitwise_or.reduce(_BITS[bits], initial=np.uint64(0)))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise number of differing bits between two uint64 arrays."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


def hamming_bands(max_hamming: int) -> list[tuple[int, int]]:
    """(shift, width) of max_hamming + 1 bit bands covering the 64 bits."""
    k = max_hamming + 1
    edges = np.linspace(0, 64, k + 1).astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])]


def band_values(hashes: np.ndarray, max_hamming: int) -> np.ndarray:
    """int64 [n, max_hamming + 1]: the bits of each band (column i = band i)."""
    h = np.asarray(hashes, dtype=np.uint64)
    bands = hamming_bands(max_hamming)
    out = np.empty((len(h), len(bands)), dtype=np.uint64)
    for i, (shift, width) in enumerate(bands):
        out[:, i] = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    return out.view(np.int64)


def near_pairs(hashes: np.ndarray, max_hamming: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of one bucket whose hashes are within max_hamming bits (all pairs checked)."""
    h = np.asarray(hashes, dtype=np.uint64)
    i, j = np.triu_indices(len(h), k=1)
    keep = hamming(h[i], h[j]) <= max_hamming
    return i[keep], j[keep]
