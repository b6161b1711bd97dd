"""The packed shard format (one row = one packed training sequence), shared by pack and train."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from operators.packing.sample import Pack, Piece

PACKED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),  # -100 = not learned
        ("position_ids", pa.list_(pa.int32())),  # restart at 0 at every piece boundary
        ("cu_seqlens", pa.list_(pa.int32())),  # [0, end_1, ..., num_tokens]
        ("sample_ids", pa.list_(pa.string())),  # canonical id, or "<id>#<k>" for piece k
        ("images", pa.list_(pa.binary())),  # encoded bytes in order of appearance
        ("tiles_per_image", pa.list_(pa.int32())),  # thumbnail included
        ("image_max_tiles", pa.list_(pa.int32())),  # max_num used for each image's tiling
        ("image_augment", pa.list_(pa.bool_())),  # the sample's data_augment flag, per image
        ("num_tokens", pa.int32()),
        ("num_tiles", pa.int32()),
    ]
)


def packed_row(pack: Pack) -> dict:
    """One pack of `Piece` records as a row of PACKED_SCHEMA."""
    pieces: list[Piece] = [r.payload for r in pack.records]
    lengths = [p.tokens for p in pieces]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    row = {
        "input_ids": np.concatenate([p.input_ids for p in pieces]).astype(np.int32),
        "labels": np.concatenate([p.labels for p in pieces]).astype(np.int32),
        "position_ids": positions,
        "cu_seqlens": cu,
        "sample_ids": [p.sample_id for p in pieces],
        "images": [b for p in pieces for b in p.images],
        "tiles_per_image": [t for p in pieces for t in p.tiles_per_image],
        "image_max_tiles": [t for p in pieces for t in p.image_max_tiles],
        "image_augment": [a for p in pieces for a in p.image_augment],
        "num_tokens": int(cu[-1]),
        "num_tiles": sum(p.tiles for p in pieces),
    }
    return row


def packs_to_table(packs: list[Pack]) -> pa.Table:
    rows = [packed_row(p) for p in packs]
    cols = {name: [r[name] for r in rows] for name in PACKED_SCHEMA.names}
    return pa.table(cols, schema=PACKED_SCHEMA)
