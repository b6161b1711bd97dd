"""Exact duplicates: a 128-bit content hash of the normalised text of all turns plus image bytes.

The normalised text is its token sequence (text.tokens: lowercase, punctuation and whitespace
dropped, CJK characters one by one), so copies that differ only in case, spacing or punctuation hash
the same. The hash is xxh3-128 over the 64-bit token hashes that MinHash computes anyway (one
vectorised pass, no per-document regex), then each image length-prefixed.
"""

from __future__ import annotations

import pyarrow as pa
import xxhash

from operators.base import conversation_texts
from operators.dedup.minhash import TokenHasher, doc_pieces


def content_hashes_of(texts: list[str], images: list[list[bytes] | None],
                      tokens: TokenHasher | None = None) -> list[bytes | None]:
    """Per document, xxh3-128 of its token hashes, then of each image (length-prefixed); None for a
    text that normalises to nothing (no tokens), which must never make an exact-duplicate group.
    `tokens`: a TokenHasher to reuse (a MinHasher's), else one is built."""
    tokens = tokens or TokenHasher()
    out: list[bytes | None] = []
    start = 0
    for piece in doc_pieces(texts):
        out += content_hashes_of_tokens(*tokens.token_hashes(piece), images[start : start + len(piece)])
        start += len(piece)
    return out


def content_hashes_of_tokens(th, counts, images: list[list[bytes] | None]) -> list[bytes | None]:
    """`content_hashes_of` for one batch given its `TokenHasher.token_hashes` (token hashes, counts)."""
    raw = th.tobytes()
    out: list[bytes | None] = []
    pos = 0
    for k, c in enumerate(counts.tolist()):
        if c == 0:
            out.append(None)
            continue
        h = xxhash.xxh3_128(raw[pos * 8 : (pos + c) * 8])
        pos += c
        for img in images[k] or []:
            h.update(b"\x00img" + len(img).to_bytes(8, "little"))
            h.update(img)
        out.append(h.digest())
    return out


def content_hash(text: str, images: list[bytes] | None = None) -> bytes | None:
    """`content_hashes_of` for one document."""
    return content_hashes_of([text], [images])[0]


def content_hashes(table: pa.Table, tokens: TokenHasher | None = None) -> list[bytes | None]:
    """Per row of a canonical table: the content hash of all turns' text and the row's images."""
    texts = conversation_texts(table, "all")
    images = table.column("images").to_pylist() if "images" in table.column_names else [None] * len(texts)
    return content_hashes_of(texts, images, tokens)
