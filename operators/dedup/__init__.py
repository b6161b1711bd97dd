"""Exact, MinHash near-duplicate and image near-duplicate dedup: the per-row and per-partition pieces.

The global stage that wires them together, as Ray tasks over partitions in storage, is
pipeline/dedup_stage.py (`decisions_by_shard`, `dedup_dataset`).
"""

from operators.dedup.exact import content_hash, content_hashes
from operators.dedup.image import phash
from operators.dedup.lsh import band_keys, estimated_jaccard, optimal_param
from operators.dedup.minhash import MinHasher, fast_shingle_hash32, sha1_hash32
from operators.dedup.text import normalize, tokens

__all__ = [
    "MinHasher",
    "band_keys",
    "content_hash",
    "content_hashes",
    "estimated_jaccard",
    "fast_shingle_hash32",
    "normalize",
    "optimal_param",
    "phash",
    "sha1_hash32",
    "tokens",
]
