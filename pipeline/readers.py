"""Readers: InternVL meta JSON + JSONL + image folders, bare JSONL, WebDataset tars, Parquet.

`plan_tasks` (on the driver) turns the sources into small JSON-able read tasks, one per output shard
key; `read_task` (on a Ray worker) turns one task into canonical rows and rejected rows. Bad input
never raises out of `read_task`: each bad line or sample becomes a rejected row with a reason and,
where it could not be parsed, its raw text in `meta`.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io import IMAGE_EXTS, iter_tar_samples
from pipeline.schema import CANONICAL, ROLES

REJECTED = pa.schema(list(CANONICAL) + [pa.field("reject_reason", pa.string())])
MAX_RAW_CHARS = 1 << 20  # raw text kept for an unparsable line (1 MiB); longer lines are cut and say so


class ConfigError(ValueError):
    """Bad configuration or unreadable input found before any work starts (one clear line)."""


@dataclass
class Entry:
    """One dataset of an InternVL meta JSON (or a bare JSONL / tar / Parquet source)."""

    source: str
    kind: str  # jsonl | tar | parquet
    path: str
    root: str = ""
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    repeat_time: float = 1
    category: str = ""
    extra: dict = field(default_factory=dict)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "x"


def _resolve(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def entries_from_sources(sources: list[str], image_root: str | None = None) -> list[Entry]:
    """Classify each SRC: a meta .json, a .jsonl, a .tar, a .parquet, or a folder of tars/Parquet."""
    entries: list[Entry] = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise ConfigError(f"source {src} does not exist")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".tar", ".parquet", ".jsonl"))
            if not files:
                raise ConfigError(f"source folder {src} holds no .tar, .parquet or .jsonl files")
            for f in files:
                kind = f.suffix[1:]
                entries.append(Entry(_safe(p.name), kind, str(f), root=image_root or str(f.parent)))
        elif p.suffix == ".json":
            entries += _meta_entries(p)
        elif p.suffix == ".jsonl":
            entries.append(Entry(_safe(p.stem), "jsonl", str(p), root=image_root or str(p.parent)))
        elif p.name.endswith((".tar", ".tar.gz", ".tgz")):
            entries.append(Entry(_safe(p.name.split(".")[0]), "tar", str(p)))
        elif p.suffix == ".parquet":
            entries.append(Entry(_safe(p.stem), "parquet", str(p)))
        else:
            raise ConfigError(f"source {src}: expected a meta .json, .jsonl, .tar, .parquet or a folder")
    names = [(e.source, e.path) for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError("the same source file is given twice")
    return entries


def _meta_entries(meta: Path) -> list[Entry]:
    try:
        spec = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"meta file {meta}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"meta file {meta}: expected an object of datasets")
    base = str(meta.parent)
    out = []
    for name, d in spec.items():
        if not isinstance(d, dict) or "annotation" not in d:
            raise ConfigError(f"meta file {meta}: dataset {name!r} has no 'annotation'")
        repeat = d.get("repeat_time", 1)
        if not isinstance(repeat, int | float) or repeat <= 0 or (repeat > 1 and int(repeat) != repeat):
            # InternVL asserts an integer repeat_time above 1 (internvl_chat/.../dataset.py)
            raise ConfigError(f"meta file {meta}: dataset {name!r}: repeat_time must be > 0 and an integer when > 1")
        ann = _resolve(base, d["annotation"])
        if not os.path.isfile(ann):
            raise ConfigError(f"meta file {meta}: dataset {name!r}: annotation {ann} not found")
        known = {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "category", "length"}
        out.append(Entry(
            source=_safe(name), kind="jsonl", path=ann, root=_resolve(base, d.get("root", "") or "."),
            data_augment=bool(d.get("data_augment", False)), max_dynamic_patch=d.get("max_dynamic_patch"),
            repeat_time=repeat, category=str(d.get("category", "") or ""),
            extra={k: v for k, v in d.items() if k not in known},
        ))
    return out


def plan_tasks(entries: list[Entry], rows_per_shard: int) -> list[dict]:
    """One task per output key. JSONL files are cut into chunks of rows_per_shard lines (byte offsets
    found in one pass, so workers seek instead of rescanning); repeat_time copies become tasks too."""
    tasks = []
    for e in entries:
        base = {"entry": e.__dict__}
        stem = _safe(Path(e.path).name.split(".")[0])
        if e.kind != "jsonl":
            tasks.append({**base, "key": f"{e.source}-{stem}", "copy": 0})
            continue
        offsets = _line_offsets(e.path)
        n = len(offsets)
        if e.repeat_time < 1:
            n = int(n * e.repeat_time)  # keep the first int(N*r) lines, as InternVL does
        copies = max(1, int(e.repeat_time))
        for copy in range(copies):
            for c, start in enumerate(range(0, n, rows_per_shard)):
                tasks.append({**base, "key": f"{e.source}-{stem}-r{copy}-{c:05d}", "copy": copy,
                              "start": start, "stop": min(n, start + rows_per_shard), "offset": offsets[start]})
    keys = [t["key"] for t in tasks]
    if len(set(keys)) != len(keys):
        raise ConfigError("two sources map to the same output name; rename one of them")
    return tasks


def _line_offsets(path: str) -> list[int]:
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


# ---- worker side ---------------------------------------------------------------------------------

def read_task(task: dict) -> tuple[list[dict], list[dict]]:
    """Read one task into (kept rows, rejected rows) of canonical dicts."""
    e = Entry(**task["entry"])
    reader = {"jsonl": _read_jsonl, "tar": _read_tar, "parquet": _read_parquet}[e.kind]
    kept, rejected = [], []
    for row, reason in reader(e, task):
        if reason:
            row["reject_reason"] = f"ingest:{reason}"
            rejected.append(row)
        else:
            kept.append(row)
    return kept, rejected


def _raw_row(e: Entry, rid: str, raw: str, **meta) -> dict:
    note = {"raw": raw[:MAX_RAW_CHARS], **meta}
    if len(raw) > MAX_RAW_CHARS:
        note["raw_truncated_from"] = len(raw)
    return {"id": rid, "source": e.source, "category": e.category, "conversations": [], "images": [],
            "meta": json.dumps(note, ensure_ascii=False)}


def _read_jsonl(e: Entry, task: dict):
    suffix = f"#r{task['copy']}" if task["copy"] else ""
    with open(e.path, "rb") as f:
        f.seek(task["offset"])
        line_no = task["start"]
        while line_no < task["stop"]:
            raw = f.readline()
            if not raw:
                break
            if not raw.strip():
                continue
            rid = f"{e.source}/{line_no}{suffix}"
            line_no += 1
            text = raw.decode("utf-8", errors="replace")
            try:
                rec = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                yield _raw_row(e, rid, text), "bad_json"
                continue
            if not isinstance(rec, dict):
                yield _raw_row(e, rid, text), "bad_record"
                continue
            yield _from_record(e, rid, rec, text, _load_files(e.root, rec.get("image")))


def _load_files(root: str, image) -> tuple[list[bytes], list[str], str | None]:
    if image is None or image == "" or image == []:
        return [], [], None
    paths = image if isinstance(image, list) else [image]
    if not all(isinstance(p, str) and p for p in paths):
        return [], [], "bad_image_field"
    out, resolved = [], []
    for p in paths:
        full = _resolve(root, p)
        resolved.append(full)
        try:
            with open(full, "rb") as f:
                out.append(f.read())
        except (OSError, ValueError):  # ValueError: a path with a NUL byte
            return [], resolved, "missing_image"
    return out, resolved, None


def _from_record(e: Entry, rid: str, rec: dict, raw: str, loaded) -> tuple[dict, str | None]:
    images, paths, problem = loaded
    if problem:
        return _raw_row(e, rid, raw, image_paths=paths), problem
    sizes = []
    for b in images:
        size = decode_size(b)
        if size is None:
            return _raw_row(e, rid, raw, image_paths=paths), "undecodable_image"
        sizes.append(size)
    conv, reason = check_conversations(rec.get("conversations"), len(images))
    if reason:
        return _raw_row(e, rid, raw, image_paths=paths), reason
    meta = {k: v for k, v in rec.items() if k not in ("conversations", "image", "images")}
    if "id" in meta:
        meta["orig_id"] = meta.pop("id")
    meta.update(e.extra)
    entry_says = {"data_augment": e.data_augment, "repeat_time": e.repeat_time}
    if e.max_dynamic_patch is not None:
        entry_says["max_dynamic_patch"] = e.max_dynamic_patch
    if e.kind == "jsonl":  # the meta JSON's dataset settings win over the line's
        meta.update(entry_says)
    else:  # a shard carries its own settings; the entry only fills gaps
        meta = {**entry_says, **meta}
    meta["image_sizes"] = sizes
    if paths:
        meta["image_paths"] = paths
    category = e.category or str(rec.get("category", "") or "")
    row = {"id": rid, "source": e.source, "category": category, "conversations": conv, "images": images,
           "meta": json.dumps(meta, ensure_ascii=False, default=str)}
    return row, None


def decode_size(data: bytes) -> tuple[int, int] | None:
    """Fully decode an image (catches truncated files and decompression bombs); its (w, h) or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.size
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors)
        return None


def check_conversations(conv, n_images: int) -> tuple[list[dict], str | None]:
    """Validate InternVL turns; returns (normalised turns, reject reason or None).

    A single-image sample without `<image>` gets `<image>\\n` prepended to its first human turn,
    as InternVL's loader does."""
    if not isinstance(conv, list) or not conv:
        return [], "empty_conversation"
    turns = []
    for t in conv:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            return [], "malformed_conversation"
        if t["from"] not in ROLES:
            return [], "unknown_role"
        turns.append({"from": t["from"], "value": t["value"]})
    if not any(t["from"] == "gpt" for t in turns):
        return [], "no_gpt_turn"
    placeholders = sum(t["value"].count("<image>") for t in turns)
    if n_images == 1 and placeholders == 0:
        first = next((t for t in turns if t["from"] == "human"), None)
        if first is None:
            return [], "image_count_mismatch"
        first["value"] = "<image>\n" + first["value"]
        placeholders = 1
    if placeholders != n_images:
        return [], "image_count_mismatch"
    return turns, None


def _read_tar(e: Entry, task: dict):
    tar_stem = _safe(Path(e.path).name.split(".")[0])
    seen, keys = 0, set()
    try:
        for key, files, problem in iter_tar_samples(e.path):
            seen += 1
            rid = f"{e.source}/{tar_stem}/{key}"
            raw_json = files.get("json", b"").decode("utf-8", errors="replace")
            if key in keys:  # WebDataset keys are contiguous; a key seen again is a malformed tar
                yield _raw_row(e, f"{rid}@{seen}", raw_json), "duplicate_tar_key"
                continue
            keys.add(key)
            if problem:
                yield _raw_row(e, rid, raw_json, tar_problem=problem), "unsafe_tar_member"
                continue
            try:
                rec = json.loads(raw_json) if raw_json else None
            except (json.JSONDecodeError, RecursionError):
                rec = None
            if not isinstance(rec, dict):
                yield _raw_row(e, rid, raw_json), "bad_json"
                continue
            idx = []
            for s in files:
                parts = s.split(".")
                if parts[-1].lower() in IMAGE_EXTS:
                    order = int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else -1
                    idx.append((order, s))
            images = [files[s] for _o, s in sorted(idx)]
            yield _from_record(e, rid, rec, raw_json, (images, [], None))
    except (tarfile.TarError, OSError, EOFError) as err:
        # the rest of the file cannot be read: one rejected row names the file and where it broke
        yield _raw_row(e, f"{e.source}/{tar_stem}/@{seen}", "", file=e.path, error=str(err)), "corrupt_shard"


def _read_parquet(e: Entry, task: dict):
    stem = _safe(Path(e.path).stem)
    try:
        table = pq.read_table(e.path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for truncated or foreign files
        yield _raw_row(e, f"{e.source}/{stem}/@0", "", file=e.path, error=str(err)), "corrupt_shard"
        return
    cols = set(table.column_names)
    if "conversations" not in cols:
        for i in range(table.num_rows):
            yield _raw_row(e, f"{e.source}/{stem}/{i}", "", file=e.path, columns=sorted(cols)), "foreign_schema"
        return
    canonical = {"id", "images", "meta"} <= cols
    for i, rec in enumerate(table.to_pylist()):
        rid = rec.get("id") if canonical and rec.get("id") else f"{e.source}/{stem}/{i}"
        images = rec.get("images") if canonical else _parquet_images(rec.get("image"))
        if images is None or not all(isinstance(b, bytes) for b in images):
            yield _raw_row(e, rid, "", file=e.path, row=i), "bad_image_field"
            continue
        if canonical:
            try:
                meta = json.loads(rec.get("meta") or "{}")
            except json.JSONDecodeError:
                meta = {}
            sub = Entry(**{**e.__dict__, "source": rec.get("source") or e.source,
                           "category": rec.get("category") or e.category})
            rec = {**(meta if isinstance(meta, dict) else {}), "conversations": rec["conversations"]}
        else:
            rec = {k: v for k, v in rec.items() if k != "image" and not isinstance(v, bytes)}
            sub = e
        row, reason = _from_record(sub, rid, rec, "", (images, [], None))
        yield row, reason


def _parquet_images(value) -> list[bytes] | None:
    """`image` as bytes, a list of bytes, or HF datasets' {bytes, path} struct(s)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, dict):
            v = v.get("bytes")
        if not isinstance(v, bytes):
            return None
        out.append(v)
    return out


def rows_to_tables(kept: list[dict], rejected: list[dict]) -> tuple[pa.Table, pa.Table]:
    k = pa.Table.from_pylist(kept, schema=CANONICAL) if kept else CANONICAL.empty_table()
    r = pa.Table.from_pylist(rejected, schema=REJECTED) if rejected else REJECTED.empty_table()
    return k, r

