"""Multimodal data packing, InternVL 2.5 §4.2: Select -> Search -> Pack -> Maintain.

- Select: `select_samples` (mix sources by weight, split over-budget samples: `split_sample`)
- Search: `BufferList.find_buffer` (best fit in a sorted list, O(log n))
- Pack: `BufferList.pack_into`
- Maintain: `BestFitPacker.maintain`; at the end `Packer.finish` repacks what is left
  (`pack_offline`: first-fit decreasing, then a local and an exact search down to `lower_bound`,
  bounds.py); `Packer` wraps both modes; `pack_stream` drives it.
- `packed_row` / `PACKED_SCHEMA`: one pack as a row of the packed shard format.
"""

from operators.packing.bounds import lower_bound, size_histogram
from operators.packing.buffers import BufferList
from operators.packing.format import PACKED_SCHEMA, packed_row
from operators.packing.packer import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_RESERVE_SIZE,
    MODES,
    BestFitPacker,
    InternVLPacker,
    Packer,
    pack_stream,
)
from operators.packing.repack import (
    first_fit_decreasing,
    is_nearly_full,
    pack_offline,
    pack_partitioned,
    split_tail,
)
from operators.packing.sample import Pack, Piece, Record, Unpackable, split_sample, unpackable_reason
from operators.packing.select import select_samples

__all__ = [
    "BufferList", "PACKED_SCHEMA", "packed_row", "DEFAULT_BUFFER_SIZE", "DEFAULT_RESERVE_SIZE", "MODES",
    "BestFitPacker", "InternVLPacker", "Packer", "pack_stream", "Pack", "Piece", "Record", "Unpackable",
    "split_sample", "select_samples", "unpackable_reason", "first_fit_decreasing", "is_nearly_full",
    "pack_partitioned", "split_tail", "pack_offline", "lower_bound", "size_histogram",
]
