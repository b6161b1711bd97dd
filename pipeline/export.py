"""`ivl export`: canonical shards (an ingest or curate OUT: its kept/) back to the layouts other tools read.

- `internvl`: `OUT/meta.json` + `OUT/annotations/<source>.jsonl` + `OUT/images/<source>/..` exactly as
  InternVL's `internvl_chat` loader reads them: one meta entry per source with `root`, `annotation`,
  `data_augment`, `max_dynamic_patch` (when set), `repeat_time` and `length`; one JSON line per sample with
  `id`, `image` (a path under `root`, a list for several), `width`/`height` (`width_list`/`height_list`)
  and `conversations`. Paths are relative to OUT (InternVL opens them from its working directory: run
  it from OUT, or `ivl export --absolute-paths`).
- `llava`: `OUT/<source>.json` (a JSON array of `{id, image, conversations}`) + images; `--image_folder OUT`.
- `parquet`: `OUT/<source>/<shard>.parquet` with HF datasets' Image feature (`images: [{bytes, path}]`).

Rows go through Ray tasks, one per input shard (no row reaches the driver): each writes its images
(named by content hash, so a picture used by many samples is stored once) and its part of every source's
annotation, then its marker; one task per source then joins the parts in shard order. Every file is
committed atomically (pipeline/io.py). `repeat_time` copies (`#r<k>` ids) are not written again: the meta
entry's `repeat_time` makes them, as it made them on the way in.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import pyarrow as pa

from pipeline.io import (
    atomic_write_bytes,
    image_ext,
    join,
    list_files,
    list_input_shards,
    read_bytes,
    read_canonical,
    read_marker,
    write_marker,
    write_parquet_atomic,
)
from pipeline.jobs import AccountingError, count_rows, unit_keys
from pipeline.readers import REPEAT_COPY
from pipeline.schema import TURN

FORMATS = ("internvl", "llava", "parquet")
# HF datasets' schema note, so `datasets.load_dataset("parquet", ...)` decodes `images` as Image features
HF_FEATURES = {"info": {"features": {
    "id": {"dtype": "string", "_type": "Value"}, "source": {"dtype": "string", "_type": "Value"},
    "category": {"dtype": "string", "_type": "Value"},
    "conversations": [{"from": {"dtype": "string", "_type": "Value"}, "value": {"dtype": "string", "_type": "Value"}}],
    "images": {"feature": {"_type": "Image"}, "_type": "Sequence"}, "meta": {"dtype": "string", "_type": "Value"}}}}
HF_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("category", pa.string()),
                       ("conversations", pa.list_(TURN)),
                       ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                       ("meta", pa.string())], metadata={"huggingface": json.dumps(HF_FEATURES)})


def folder_name(source: str) -> str:
    """A source as one path component (`the_cauldron/sroie` -> `the_cauldron__sroie`)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", source.replace("/", "__")).strip("_") or "x"


def _image_path(source: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()[:32]
    return f"images/{folder_name(source)}/{digest[:2]}/{digest}.{image_ext(data)}"


def export_shard(unit: dict, out_dir: str, fmt: str) -> dict:
    """One input shard -> its images, its part of each source's annotations, then its marker."""
    rows = read_canonical(unit["path"]).to_pylist()
    copies = [r for r in rows if REPEAT_COPY.search(r["id"])]
    rows = [r for r in rows if not REPEAT_COPY.search(r["id"])]
    if len(rows) + len(copies) != unit["rows"]:
        raise AccountingError(f"export unit {unit['key']} ({unit['path']}): {unit['rows']} rows counted in the file "
                              f"but {len(rows) + len(copies)} read")
    by_source: dict[str, list[dict]] = {}
    settings: dict[str, dict] = {}
    for r in rows:
        meta = json.loads(r["meta"] or "{}")
        by_source.setdefault(r["source"], []).append(r)
        settings.setdefault(r["source"], {
            "data_augment": bool(meta.get("data_augment", False)), "max_dynamic_patch": meta.get("max_dynamic_patch"),
            "repeat_time": meta.get("repeat_time", 1), "category": r["category"] or ""})
    files = []
    for source, group in by_source.items():
        if fmt == "parquet":
            path = join(out_dir, folder_name(source), f"{unit['key']}.parquet")
            table = pa.Table.from_pylist([{**r, "images": [{"bytes": b, "path": _image_path(source, b).rsplit("/", 1)[-1]}
                                                           for b in r["images"]]} for r in group], schema=HF_SCHEMA)
            write_parquet_atomic(table, path)
            files.append(path)
            continue
        lines = []
        for r in group:
            rec = {"id": r["id"]}
            paths = []
            for b in r["images"]:
                rel = _image_path(source, b)
                atomic_write_bytes(join(out_dir, rel), b)  # same bytes, same name: a rewrite changes nothing
                paths.append(rel if fmt == "llava" else rel.split("/", 2)[2])  # internvl: relative to `root`
            sizes = json.loads(r["meta"] or "{}").get("image_sizes") or []
            if len(paths) == 1:
                rec["image"] = paths[0]
                if sizes:
                    rec["width"], rec["height"] = sizes[0]
            elif paths:
                rec["image"] = paths
                if len(sizes) == len(paths):
                    rec["width_list"], rec["height_list"] = [s[0] for s in sizes], [s[1] for s in sizes]
            rec["conversations"] = r["conversations"]
            lines.append(json.dumps(rec, ensure_ascii=False))
        path = join(out_dir, "_parts", folder_name(source), f"{unit['key']}.jsonl")
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        files.append(path)
    marker = {"key": unit["key"], "input": unit["rows"], "exported": len(rows), "repeat_copies": len(copies),
              "sources": {s: {"rows": len(g), **settings[s]} for s, g in by_source.items()}}
    write_marker(out_dir, unit["key"], marker)
    return {"key": unit["key"]}


def join_source(item: dict, out_dir: str, fmt: str) -> dict:
    """A source's parts, in shard order, as one annotation file (JSONL, or a JSON array for llava)."""
    parts = [join(out_dir, "_parts", folder_name(item["source"]), f"{k}.jsonl") for k in item["keys"]]
    lines = [line for p in parts for line in read_bytes(p).decode().splitlines() if line]
    if fmt == "llava":
        data = ("[\n" + ",\n".join(lines) + "\n]\n").encode()
        atomic_write_bytes(join(out_dir, f"{folder_name(item['source'])}.json"), data)
    else:
        atomic_write_bytes(join(out_dir, "annotations", f"{folder_name(item['source'])}.jsonl"),
                           ("\n".join(lines) + "\n").encode())
    return {"source": item["source"], "lines": len(lines)}


def check_export_args(inp: str, fmt: str) -> list[str]:
    """Before Ray: the input's shards exist and the format is known (one-line errors)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return list_input_shards(inp)


def run_export(inp: str, out_dir: str, fmt: str = "internvl", absolute_paths: bool = False) -> dict:
    import ray

    t0 = time.time()
    shards = check_export_args(inp, fmt)
    keys = unit_keys(shards)
    units = [{"key": keys[p], "path": p, "rows": count_rows(p)} for p in shards]
    bad = [u["path"] for u in units if u["rows"] is None]
    if bad:
        raise ValueError(f"unreadable input shard {bad[0]}")
    todo = [u for u in units if read_marker(out_dir, u["key"]) is None]
    if todo:
        ray.data.from_items(todo, override_num_blocks=min(len(todo), 1000)).map(
            export_shard, fn_kwargs=dict(out_dir=out_dir, fmt=fmt)).materialize()
    markers = [read_marker(out_dir, u["key"]) for u in units]
    sources: dict[str, dict] = {}
    for m in markers:
        if m["input"] != m["exported"] + m["repeat_copies"]:
            raise AccountingError(f"export unit {m['key']}: {m['input']} in, {m['exported']} + {m['repeat_copies']} out")
        for s, c in m["sources"].items():
            t = sources.setdefault(s, {**c, "rows": 0, "keys": []})
            t["rows"] += c["rows"]
            t["keys"].append(m["key"])
    if fmt != "parquet" and sources:
        items = [{"source": s, "keys": c["keys"]} for s, c in sorted(sources.items())]
        joined = ray.data.from_items(items, override_num_blocks=len(items)).map(
            join_source, fn_kwargs=dict(out_dir=out_dir, fmt=fmt)).take_all()
        lines = {j["source"]: j["lines"] for j in joined}
        if any(lines[s] != c["rows"] for s, c in sources.items()):
            raise AccountingError(f"export: annotation lines {lines} differ from rows exported")
    if fmt == "internvl":
        atomic_write_bytes(join(out_dir, "meta.json"), json.dumps(
            internvl_meta(sources, out_dir if absolute_paths else None), indent=2, ensure_ascii=False).encode())
    summary = {"format": fmt, "input": sum(m["input"] for m in markers), "exported": sum(m["exported"] for m in markers),
               "repeat_copies": sum(m["repeat_copies"] for m in markers), "units": len(units),
               "resumed_units": len(units) - len(todo), "sources": {s: c["rows"] for s, c in sorted(sources.items())},
               "images": len(list_files(join(out_dir, "images"), tuple(f".{e}" for e in ("png", "jpg", "gif", "bmp",
                                                                                          "webp", "bin")))),
               "seconds": round(time.time() - t0, 2)}
    atomic_write_bytes(join(out_dir, "report", "summary.json"), json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary


def internvl_meta(sources: dict[str, dict], base: str | None) -> dict:
    """InternVL's meta JSON: the keys its loader reads (`data_augment` and `repeat_time` are required there)."""
    meta = {}
    for s, c in sorted(sources.items()):
        name = folder_name(s)
        root, ann = f"images/{name}", f"annotations/{name}.jsonl"
        if base:
            root, ann = join(base, root), join(base, ann)
        entry = {"root": root, "annotation": ann, "data_augment": c["data_augment"],
                 # rows below 1 were already cut on the way in; above 1 the copies were left out of the file
                 "repeat_time": c["repeat_time"] if c["repeat_time"] and c["repeat_time"] > 1 else 1,
                 "length": c["rows"]}
        if c.get("max_dynamic_patch") is not None:
            entry["max_dynamic_patch"] = c["max_dynamic_patch"]
        if c.get("category"):
            entry["category"] = c["category"]
        meta[s] = entry
    return meta
