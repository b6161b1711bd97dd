"""Readers: every supported layout, detected by looking at it, into canonical rows.

`entries_from_sources` (on the driver, before Ray starts) classifies each SRC: an InternVL meta JSON, a
JSONL, a JSON array (LLaVA / ShareGPT4V), a Parquet file (HF datasets, the_cauldron, LLaVA-OneVision,
ivl's shards), a WebDataset tar (`.tar`, `.tar.gz`, `.tgz`; img2dataset's with `.txt` captions), or a
folder of them (hub datasets with nested subsets; img2dataset's `.parquet`/`_stats.json` sidecars).
What a file holds decides its layout (pipeline/records.py); `--input-format` forces one; anything else
fails at start with one line naming the file, what was found and what is supported.
`plan_tasks` cuts the entries into small JSON-able read tasks, one per output key; `read_task` (on a Ray
worker) turns one task into kept and rejected rows, and `count_input` counts the same task's input rows
apart from the readers (lines, array elements, tar samples from headers, Parquet footers), so a reader
that loses a row fails the job instead of shrinking it. Bad input never raises out of `read_task`: each
bad line or sample becomes a rejected row with a reason and, where it could not be parsed, its raw text.

Ids: `<source>/<line>` for a meta dataset or one JSONL/JSON file, `<source>/<file>/<key>` otherwise,
where `<source>` is the dataset name, or the path below what the user named (`hub/sroie`); two sources
that would share a name get the name of what the user named in front (`meta_a/caption`).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from operators.conversation import check_conversation
from operators.images import ImageError, decode_image
from pipeline.io import (
    IMAGE_EXTS,
    basename,
    dirname,
    exists,
    is_uri,
    isdir,
    isfile,
    iter_tar_samples,
    join,
    list_files,
    open_input,
    read_bytes,
    relpath,
)
from pipeline.jsonarray import BOM, NotAnArray, element_spans, open_binary, read_span
from pipeline.records import DEFAULT_INSTRUCTION, RecordProblem, layout_of, load_images, split_record
from pipeline.schema import CANONICAL

REJECTED = pa.schema(list(CANONICAL) + [pa.field("reject_reason", pa.string())])
MAX_RAW_CHARS = 1 << 20  # raw text kept for an unparsable line (1 MiB); longer lines are cut and say so
PEEK_LINES = 50  # JSONL lines looked at to tell the layout
# keys of an InternVL line that has lost its conversations: its rows are rejected one by one, not the file
INTERNVL_KEYS = frozenset({"id", "image", "images", "video", "width", "height", "category", "source"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REPEAT_COPY = re.compile(r"#r\d+$")  # the id suffix of a `repeat_time` copy: `<source>/<line>#r<k>`
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", *TAR_SUFFIXES)
# --input-format -> record layout (pipeline/records.py); the container comes from the file
INPUT_FORMATS = {
    "auto": None, "internvl": "conversations", "llava": "conversations", "llava-onevision": "conversations",
    "sharegpt": "conversations", "webdataset": "conversations", "messages": "messages", "cauldron": "cauldron",
    "img2dataset": "caption", "ivl": "canonical",
}
SUPPORTED = ("supported: InternVL meta .json + .jsonl, LLaVA/ShareGPT .json arrays, OpenAI/TRL `messages`, "
             "LLaMA-Factory ShareGPT, HF Parquet (`image`/`images`), the_cauldron (`texts`), LLaVA-OneVision, "
             "WebDataset/img2dataset .tar/.tar.gz/.tgz, ivl shards, or folders of them")


class ConfigError(ValueError):
    """Bad configuration or unreadable input found before any work starts (one clear line)."""


@dataclass
class Entry:
    """One dataset to read: an InternVL meta entry, or one file of what the user named."""

    source: str
    kind: str  # jsonl | json | tar | parquet
    path: str
    root: str = ""
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    repeat_time: float = 1
    category: str = ""
    extra: dict = field(default_factory=dict)
    layout: str = "conversations"  # pipeline/records.py LAYOUTS
    id_prefix: str = ""  # ids are `<id_prefix>/<line or key>`
    encoding: str | None = None  # None: UTF-8, and invalid bytes are rejected
    instruction: str = DEFAULT_INSTRUCTION  # caption layouts: the question a caption answers
    remote_images: bool = False  # read s3:// gs:// https:// images (else ingest:remote_image)
    from_meta: bool = False  # a meta JSON's dataset settings win over the record's
    origin: str = ""  # the SRC this entry came from (names colliding sources)
    stats: str | None = None  # img2dataset's `<shard>_stats.json` beside a tar


@dataclass
class Options:
    image_root: str | None = None
    forced: str | None = None
    encoding: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    remote_images: bool = False


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "x"


def _resolve(base: str, p: str) -> str:
    """`p` relative to the folder `base` (a local path or a URI); absolute paths and URIs stay as they are."""
    if os.path.isabs(p) or is_uri(p):
        return p
    return join(base, p) if is_uri(base) else os.path.normpath(os.path.join(base, p))


def _stem(name: str) -> str:
    for suf in DATA_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def check_encoding(encoding: str | None) -> None:
    """Only ASCII-compatible encodings: lines, brackets and quotes must be the bytes they are in ASCII."""
    if encoding is None:
        return
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(f"unknown encoding {encoding!r}") from None
    if "\n[]{}\",\\".encode(encoding, "strict") != b"\n[]{}\",\\":
        raise ConfigError(f"encoding {encoding!r} is not ASCII-compatible; convert the file to UTF-8")


def decode_text(raw: bytes, encoding: str | None) -> str | None:
    """Text of one line or member: UTF-8 (BOM dropped) unless an encoding is declared; None if invalid."""
    if raw.startswith(BOM) and encoding in (None, "utf-8", "utf8", "utf-8-sig"):
        raw = raw[len(BOM):]
    try:
        return raw.decode(encoding or "utf-8")
    except (UnicodeDecodeError, LookupError):
        return None


def shown(raw: bytes) -> str:
    """Undecodable bytes as text for a rejected row's `raw` (\\x escapes, nothing replaced silently)."""
    return raw.decode("utf-8", errors="backslashreplace")


# ---- sources -> entries (driver) ------------------------------------------------------------------

def entries_from_sources(sources: list[str], image_root: str | None = None, input_format: str = "auto",
                         encoding: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                         remote_images: bool = False, skipped: list | None = None) -> list[Entry]:
    """Classify every SRC into entries; raises ConfigError (one line) on anything unsupported.
    Files in a folder that are not data (dataset_info.json, a sidecar) go into `skipped` with why."""
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"--input-format {input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
    check_encoding(encoding)
    opts = Options(image_root, INPUT_FORMATS[input_format], encoding, instruction, remote_images)
    skipped = [] if skipped is None else skipped
    entries: list[Entry] = []
    for src in sources:
        src = str(src).rstrip("/") if is_uri(src) else os.path.normpath(str(src))
        if not exists(src):
            raise ConfigError(f"source {src} does not exist")
        if isdir(src):
            entries += _folder_entries(src, opts, skipped)
        else:
            entries += _file_entries(src, opts, source=_safe(_stem(basename(src))), in_folder=False, origin=src)
    seen = Counter((e.source, e.path) for e in entries)
    if any(n > 1 for n in seen.values()):
        raise ConfigError(f"the same source file is given twice: {next(p for (_s, p), n in seen.items() if n > 1)}")
    _make_unique(entries)
    return entries


def _folder_entries(folder: str, opts: Options, skipped: list) -> list[Entry]:
    base = join(folder, "kept") if isdir(join(folder, "kept")) else folder  # an ivl job's OUT: its kept/
    files = [f for f in list_files(base, DATA_SUFFIXES)
             if not any(part.startswith((".", "_")) for part in relpath(f, base).split("/"))]
    if not files:
        raise ConfigError(f"source folder {folder} holds no data files ({', '.join(DATA_SUFFIXES)}); {SUPPORTED}")
    kinds = {f: _json_kind(f) for f in files if f.endswith(".json") and not f.endswith("_stats.json")}
    metas = [f for f, k in kinds.items() if k in ("meta", "broken")]
    entries, used = [], set()
    for m in metas:
        for e in _meta_entries(m, opts):
            entries.append(e)
            used.add(e.path)
    tar_stems = {(dirname(f), _stem(basename(f))) for f in files if f.endswith(TAR_SUFFIXES)}
    for f in files:
        if f in metas or f in used:
            continue
        name = basename(f)
        if name.endswith("_stats.json") and (dirname(f), name[: -len("_stats.json")]) in tar_stems:
            continue  # img2dataset's stats: read with its tar (expected sample count)
        if name.endswith(".parquet") and (dirname(f), _stem(name)) in tar_stems:
            skipped.append({"file": f, "why": "img2dataset metadata beside its .tar (kept in each row's meta)"})
            continue
        if name.endswith(".json") and kinds.get(f) != "array":
            skipped.append({"file": f, "why": "a JSON object that is not an InternVL meta file"})
            continue
        subset = relpath(f, base).split("/")[:-1]
        source = "/".join(_safe(x) for x in (basename(folder), *subset))
        entries += _file_entries(f, opts, source=source, in_folder=True, origin=folder)
    return entries


def _json_kind(path: str) -> str:
    """'meta' (an object of datasets), 'array' (a JSON array), 'broken' (an object that does not parse),
    or 'object' (anything else)."""
    with open_binary(path) as f:
        head = f.read(4096)
    head = head[len(BOM):] if head.startswith(BOM) else head
    first = head.lstrip()[:1]
    if first == b"[":
        return "array"
    if first != b"{":
        return "object"
    try:
        spec = json.loads(decode_text(read_bytes(path), None) or "")
    except json.JSONDecodeError:
        return "broken"
    ok = isinstance(spec, dict) and spec and all(isinstance(d, dict) and "annotation" in d for d in spec.values())
    return "meta" if ok else "object"


def _file_entries(p: str, opts: Options, source: str, in_folder: bool, origin: str) -> list[Entry]:
    name = basename(p)
    parent = dirname(p)
    stem = _safe(_stem(name))
    common = dict(encoding=opts.encoding, instruction=opts.instruction, remote_images=opts.remote_images,
                  origin=origin)
    if name.endswith(".json"):
        kind = _json_kind(p)
        if kind in ("meta", "broken"):  # a broken one fails in _meta_entries, naming the JSON error
            return _meta_entries(p, opts)
        if kind != "array":
            raise ConfigError(f"{p}: a JSON object that is not an InternVL meta file (no dataset with an "
                              f"'annotation'); {SUPPORTED}")
        layout = opts.forced or _array_layout(p, opts.encoding)
        prefix = f"{source}/{stem}" if in_folder else source
        return [Entry(source, "json", p, root=opts.image_root or parent, layout=layout,
                      id_prefix=prefix, **common)]
    if name.endswith(".jsonl"):
        layout = opts.forced or _jsonl_layout(p, opts.encoding)
        prefix = f"{source}/{stem}" if in_folder else source
        return [Entry(source, "jsonl", p, root=opts.image_root or parent, layout=layout,
                      id_prefix=prefix, **common)]
    if name.endswith(TAR_SUFFIXES):
        layout = opts.forced or _tar_layout(p)
        stats = join(parent, f"{_stem(name)}_stats.json")
        return [Entry(source, "tar", p, root=opts.image_root or parent, layout=layout,
                      id_prefix=f"{source}/{stem}", stats=stats if isfile(stats) else None, **common)]
    if name.endswith(".parquet"):
        layout = opts.forced or _parquet_layout(p)
        return [Entry(source, "parquet", p, root=opts.image_root or parent, layout=layout,
                      id_prefix=f"{source}/{stem}", **common)]
    raise ConfigError(f"source {p}: unsupported file type; {SUPPORTED}")


def _unsupported(p, found: str) -> ConfigError:
    return ConfigError(f"{p}: unsupported layout ({found}); {SUPPORTED}")


def _jsonl_layout(p: str, encoding: str | None) -> str:
    """The layout the first parsable records spell; `conversations` when no line parses (each bad line
    is then a rejected row)."""
    looked = []
    with open_binary(p) as f:
        for raw in f:
            if not raw.strip():
                continue
            text = decode_text(raw, encoding)
            try:
                rec = json.loads(text) if text is not None else None
            except (json.JSONDecodeError, RecursionError):
                rec = None
            if isinstance(rec, dict):
                layout = layout_of(rec)
                if layout in ("conversations", "messages", "cauldron"):
                    return layout
                if not set(rec) <= INTERNVL_KEYS:
                    looked.append(sorted(rec)[:8])
            if len(looked) >= PEEK_LINES or f.tell() > (64 << 20):
                break
    if looked:
        raise _unsupported(p, f"records with keys {looked[0]}")
    return "conversations"


def _array_layout(p: str, encoding: str | None) -> str:
    try:
        spans = element_spans(p, stop_after=1)
    except NotAnArray as e:
        raise ConfigError(str(e)) from None
    if not spans:
        return "conversations"
    with open_binary(p) as f:
        text = decode_text(read_span(f, spans[0]), encoding)
    try:
        rec = json.loads(text) if text is not None else None
    except (json.JSONDecodeError, RecursionError):
        return "conversations"  # a broken first element is a rejected row
    layout = layout_of(rec) if isinstance(rec, dict) else None
    if layout not in ("conversations", "messages", "cauldron"):
        found = f"elements with keys {sorted(rec)[:8]}" if isinstance(rec, dict) else f"a {type(rec).__name__}"
        raise _unsupported(p, found)
    return layout


def _parquet_layout(p: str) -> str:
    try:
        with open_input(p) as f:
            names = pq.read_schema(f).names
    except Exception:  # a corrupt file is read as one corrupt_shard row (or stopped by --fail-fast)
        return "canonical"
    layout = layout_of(names)
    if layout is None:
        hint = " (img2dataset's metadata: give its .tar or the folder)" if {"key", "status", "url"} <= set(names) else ""
        raise _unsupported(p, f"columns {sorted(names)[:10]}{hint}")
    return layout


def _tar_layout(p: str) -> str:
    """From the first samples: `.json` turns (`conversations`, or ivl's own rows), `.txt` captions beside an
    image (img2dataset), or messages/cauldron records; unparsable samples are rows to reject, not a verdict."""
    foreign = None
    try:
        for n, (_key, files, _problem) in enumerate(iter_tar_samples(p)):
            if n >= PEEK_LINES:
                break
            rec = None
            if "json" in files:
                try:
                    rec = json.loads(files["json"])
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    rec = None
            layout = layout_of(rec) if isinstance(rec, dict) else None
            if layout == "conversations":
                return "canonical" if {"id", "source", "meta"} <= set(rec) else "conversations"
            if layout in ("messages", "cauldron"):
                return layout
            if "txt" in files and any(s.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for s in files):
                return "caption"
            if isinstance(rec, dict) and not set(rec) <= INTERNVL_KEYS:
                foreign = foreign or f"a sample whose .json has keys {sorted(rec)[:8]}"
            elif "json" not in files and files:
                foreign = foreign or f"a sample with members {sorted(files)[:8]} (no .json, no .txt caption)"
    except (tarfile.TarError, OSError, EOFError):
        pass  # an unreadable tar is one corrupt_shard row (or stopped by --fail-fast)
    if foreign:
        raise _unsupported(p, foreign)
    return "conversations"


def _meta_entries(meta: str, opts: Options) -> list[Entry]:
    try:
        spec = json.loads(decode_text(read_bytes(meta), None) or "")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"meta file {meta}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"meta file {meta}: expected an object of datasets")
    base = dirname(meta)
    out = []
    for name, d in spec.items():
        if not isinstance(d, dict) or "annotation" not in d:
            raise ConfigError(f"meta file {meta}: dataset {name!r} has no 'annotation'")
        repeat = d.get("repeat_time", 1)
        if not isinstance(repeat, int | float) or repeat <= 0 or (repeat > 1 and int(repeat) != repeat):
            # InternVL asserts an integer repeat_time above 1 (internvl_chat/.../dataset.py)
            raise ConfigError(f"meta file {meta}: dataset {name!r}: repeat_time must be > 0 and an integer when > 1")
        ann = _resolve(base, d["annotation"])
        if not isfile(ann):
            raise ConfigError(f"meta file {meta}: dataset {name!r}: annotation {ann} not found")
        encoding = d.get("encoding", opts.encoding)
        check_encoding(encoding)
        sub = Options(None, opts.forced, encoding, opts.instruction, opts.remote_images)
        (e,) = _file_entries(ann, sub, source=_safe(name), in_folder=False, origin=meta)
        known = {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "category", "length",
                 "encoding"}
        e.root = _resolve(base, d.get("root", "") or ".")
        e.data_augment, e.max_dynamic_patch = bool(d.get("data_augment", False)), d.get("max_dynamic_patch")
        e.repeat_time, e.category = repeat, str(d.get("category", "") or "")
        e.extra = {k: v for k, v in d.items() if k not in known}
        e.id_prefix, e.from_meta = e.source, True
        out.append(e)
    return out


def _make_unique(entries: list[Entry]) -> None:
    """Sources that would share ids get more of the path the user named in front, until none collide."""
    for depth in range(1, 8):
        groups: dict[str, list[Entry]] = {}
        for e in entries:
            groups.setdefault(e.id_prefix, []).append(e)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return
        for g in clashes:
            for e in g:
                path_parts = [x for x in _stem(e.origin).replace("://", "/").split("/") if x]
                parts = path_parts[-depth:] if depth < 7 else [str(entries.index(e))]
                label = "/".join(_safe(x) for x in parts)
                old = e.source
                e.source = f"{label}/{old}" if depth == 1 else f"{label}/{old.split('/', depth - 1)[-1]}"
                e.id_prefix = e.source + e.id_prefix[len(old):]


# ---- entries -> tasks (driver) --------------------------------------------------------------------

def plan_tasks(entries: list[Entry], rows_per_shard: int) -> list[dict]:
    """One task per output key. JSONL files are cut into chunks of rows_per_shard lines and JSON arrays
    into chunks of elements (offsets found in one pass, so workers seek instead of rescanning); the
    pass is also the input count. repeat_time copies become tasks too."""
    tasks = []
    for e in entries:
        base = {"entry": e.__dict__}
        stem = _safe(_stem(basename(e.path)))
        key = f"{_safe(e.source)}-{stem}"
        if e.kind in ("tar", "parquet"):
            tasks.append({**base, "key": key, "copy": 0})
            continue
        if e.kind == "jsonl":
            offsets = _line_offsets(e.path)
        else:
            try:
                offsets = element_spans(e.path)
            except NotAnArray as err:
                raise ConfigError(str(err)) from None
        n = len(offsets)
        if e.repeat_time < 1:
            n = int(n * e.repeat_time)  # keep the first int(N*r) lines, as InternVL does
        copies = max(1, int(e.repeat_time))
        for copy in range(copies):
            for c, start in enumerate(range(0, n, rows_per_shard)):
                stop = min(n, start + rows_per_shard)
                t = {**base, "key": f"{key}-r{copy}-{c:05d}", "copy": copy, "start": start, "stop": stop}
                if e.kind == "jsonl":
                    t["offset"] = offsets[start]
                else:
                    t["spans"] = [list(s) for s in offsets[start:stop]]
                tasks.append(t)
    seen: Counter = Counter()
    for t in tasks:  # two names that _safe makes alike ("a/b", "a_b") still get their own files
        seen[t["key"]] += 1
        if seen[t["key"]] > 1:
            t["key"] = f"{t['key']}-{seen[t['key']] - 1}"
    return tasks


def _line_offsets(path: str) -> list[int]:
    offsets, pos = [], 0
    with open_binary(path) as f:
        for line in f:
            if line.strip() and line.strip() != BOM:
                offsets.append(pos)
            pos += len(line)
    return offsets


# ---- input counts, apart from the readers (worker) ------------------------------------------------

def count_input(task: dict) -> int:
    """Rows this task must account for, counted from the input without the readers: the lines or array
    elements found at planning, tar samples from the headers, the Parquet footer's row count. A file
    that breaks part-way counts what was countable plus one row for the unreadable rest."""
    e = task["entry"]
    if e["kind"] in ("jsonl", "json"):
        return task["stop"] - task["start"]
    if e["kind"] == "parquet":
        try:
            with open_input(e["path"]) as f:
                return pq.ParquetFile(f).metadata.num_rows
        except Exception:  # unreadable footer: the whole file is one corrupt_shard row
            return 1
    return count_tar_samples(e["path"])


def count_tar_samples(path: str) -> int:
    """WebDataset samples (runs of members sharing a key) from the tar headers alone; a sample still open
    when the tar breaks is not counted, the unreadable rest is one row."""
    n, current = 0, None
    try:
        with open_input(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                if m.isdir():
                    continue
                base = os.path.basename(m.name)
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                if key != current:
                    n, current = n + 1, key
    except (tarfile.TarError, OSError, EOFError):
        return n - (current is not None) + 1
    return n


def img2dataset_expected(stats_path: str | None) -> int | None:
    """img2dataset's own count of samples written to the shard (`successes` in its stats file)."""
    if not stats_path:
        return None
    try:
        return int(json.loads(read_bytes(stats_path))["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- worker side ---------------------------------------------------------------------------------

def read_task(task: dict) -> tuple[list[dict], list[dict]]:
    """Read one task into (kept rows, rejected rows) of canonical dicts."""
    e = Entry(**task["entry"])
    reader = READERS[e.kind]
    kept, rejected = [], []
    for row, reason in reader(e, task):
        if reason:
            row["reject_reason"] = f"ingest:{reason}"
            rejected.append(row)
        else:
            kept.append(row)
    return kept, rejected


def repeat_suffix(copy: int) -> str:
    """The id suffix of the `copy`-th `repeat_time` copy of a line ("" for the line itself)."""
    return f"#r{copy}" if copy else ""


def _raw_row(e: Entry, rid: str, raw: str, **meta) -> dict:
    note = {"raw": raw[:MAX_RAW_CHARS], **meta}
    if len(raw) > MAX_RAW_CHARS:
        note["raw_truncated_from"] = len(raw)
    return {"id": rid, "source": e.source, "category": e.category, "conversations": [], "images": [],
            "meta": json.dumps(note, ensure_ascii=False, default=str)}


def _parse_line(e: Entry, rid: str, raw: bytes) -> tuple[dict, str, str | None]:
    """(record, its text, None) or (rejected row, "", reason) for one JSONL line or JSON array element."""
    text = decode_text(raw, e.encoding)
    if text is None:
        return _raw_row(e, rid, shown(raw), encoding=e.encoding or "utf-8"), "", "bad_encoding"
    try:
        rec = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _raw_row(e, rid, text), "", "bad_json"
    if not isinstance(rec, dict):
        return _raw_row(e, rid, text), "", "bad_record"
    return rec, text, None


def _read_jsonl(e: Entry, task: dict):
    suffix = repeat_suffix(task["copy"])
    with open_binary(e.path) as f:
        f.seek(task["offset"])
        line_no = task["start"]
        while line_no < task["stop"]:
            raw = f.readline()
            if not raw:
                break
            if not raw.strip() or raw.strip() == BOM:
                continue
            rid = f"{e.id_prefix}/{line_no}{suffix}"
            line_no += 1
            rec, text, reason = _parse_line(e, rid, raw)
            yield (rec, reason) if reason else _sample(e, rid, rec, text)


def _read_json_array(e: Entry, task: dict):
    suffix = repeat_suffix(task["copy"])
    with open_binary(e.path) as f:
        for i, span in enumerate(task["spans"]):
            rid = f"{e.id_prefix}/{task['start'] + i}{suffix}"
            rec, text, reason = _parse_line(e, rid, read_span(f, span))
            yield (rec, reason) if reason else _sample(e, rid, rec, text)


def _sample(e: Entry, rid: str, rec: dict, raw: str, images: list[bytes] | None = None) -> tuple[dict, str | None]:
    """One record -> a canonical row (or a rejected row with its reason)."""
    paths: list[str] = []
    try:
        turns, refs, meta = split_record(rec, e.layout, e.instruction)
        if images is None:
            images, paths = load_images(refs, e.root, e.remote_images)
    except RecordProblem as p:
        return _raw_row(e, rid, raw, **p.detail), p.reason
    sizes = []
    for k, b in enumerate(images):
        try:  # a full decode: truncated files and decompression bombs never become samples
            with decode_image(b) as im:
                sizes.append(im.size)
        except ImageError as err:
            return _raw_row(e, rid, raw, image_paths=paths, image_index=k, image_problem=err.problem.value), \
                "undecodable_image"
    conv, problem = check_conversation(turns, len(images))
    if problem:
        return _raw_row(e, rid, raw, image_paths=paths), problem.value
    if "id" in meta:
        meta["orig_id"] = meta.pop("id")
    meta.update(e.extra)
    entry_says = {"data_augment": e.data_augment, "repeat_time": e.repeat_time}
    if e.max_dynamic_patch is not None:
        entry_says["max_dynamic_patch"] = e.max_dynamic_patch
    if e.from_meta:  # the meta JSON's dataset settings win over the line's
        meta.update(entry_says)
    else:  # a file carries its own settings; the entry only fills gaps
        meta = {**entry_says, **meta}
    meta["image_sizes"] = sizes
    if paths:
        meta["image_paths"] = paths
    category = e.category or str(rec.get("category", "") or "")
    row = {"id": rid, "source": e.source, "category": category, "conversations": conv, "images": images,
           "meta": json.dumps(meta, ensure_ascii=False, default=str)}
    return row, None


def _member_images(files: dict[str, bytes]) -> list[bytes]:
    """A sample's images in order: `<key>.<i>.<ext>` by i, a single `<key>.<ext>` first."""
    idx = []
    for s in files:
        parts = s.split(".")
        if parts[-1].lower() in IMAGE_EXTS:
            order = int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else -1
            idx.append((order, s))
    return [files[s] for _o, s in sorted(idx)]


def _read_tar(e: Entry, task: dict):
    seen, keys = 0, set()
    try:
        for key, files, problem in iter_tar_samples(e.path):
            seen += 1
            rid = f"{e.id_prefix}/{key}"
            raw = files.get("json", b"")
            if key in keys:  # WebDataset keys are contiguous; a key seen again is a malformed tar
                yield _raw_row(e, f"{rid}@{seen}", shown(raw)), "duplicate_tar_key"
                continue
            keys.add(key)
            if problem:
                yield _raw_row(e, rid, shown(raw), tar_problem=problem), "unsafe_tar_member"
                continue
            if e.layout == "caption":
                yield _caption_sample(e, rid, key, files)
                continue
            text = decode_text(raw, e.encoding) if raw else ""
            if text is None:
                yield _raw_row(e, rid, shown(raw)), "bad_encoding"
                continue
            try:
                rec = json.loads(text) if text else None
            except (json.JSONDecodeError, RecursionError):
                rec = None
            if not isinstance(rec, dict):
                yield _raw_row(e, rid, text), "bad_json"
                continue
            if e.layout == "canonical" and rec.get("id"):
                yield _canonical_sample(e, rec, _member_images(files))
                continue
            yield _sample(e, rid, rec, text, _member_images(files))
    except (tarfile.TarError, OSError, EOFError) as err:
        # the rest of the file cannot be read: one rejected row names the file and where it broke
        yield _raw_row(e, f"{e.id_prefix}/@{seen}", "", file=e.path, error=str(err)), "corrupt_shard"


def _caption_sample(e: Entry, rid: str, key: str, files: dict[str, bytes]):
    """img2dataset: `<key>.<img>` + `<key>.txt` (the caption) + `<key>.json` (its metadata -> meta)."""
    caption = decode_text(files.get("txt", b""), e.encoding)
    if caption is None:
        return _raw_row(e, rid, shown(files.get("txt", b""))), "bad_encoding"
    meta = {}
    if files.get("json"):
        text = decode_text(files["json"], e.encoding)
        try:
            meta = json.loads(text) if text is not None else {"metadata_raw": shown(files["json"])}
        except (json.JSONDecodeError, RecursionError):
            meta = {"metadata_raw": text}
        meta = meta if isinstance(meta, dict) else {"metadata_raw": text}
    meta.pop("caption", None)  # the same text as the .txt, which becomes the answer
    meta["id"] = meta.get("key") or key
    return _sample(e, rid, {**meta, "caption": caption}, caption, _member_images(files))


def _canonical_sample(e: Entry, rec: dict, images: list[bytes]):
    """An ivl shard's row: id, source, category and meta as written, checked like any other row."""
    try:
        meta = json.loads(rec.get("meta") or "{}")
    except (json.JSONDecodeError, TypeError):
        meta = {}
    sub = Entry(**{**e.__dict__, "source": rec.get("source") or e.source, "category": rec.get("category") or e.category,
                   "layout": "conversations", "from_meta": False})
    body = {**(meta if isinstance(meta, dict) else {}), "conversations": rec.get("conversations")}
    return _sample(sub, rec["id"], body, "", images)


def _read_parquet(e: Entry, task: dict):
    try:
        pf = pq.ParquetFile(open_input(e.path))
        groups = range(pf.num_row_groups)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for truncated or foreign files
        yield _raw_row(e, f"{e.id_prefix}/@0", "", file=e.path, error=str(err)), "corrupt_shard"
        return
    i = 0
    for g in groups:
        n = pf.metadata.row_group(g).num_rows
        try:
            rows = pf.read_row_group(g).to_pylist()
        except Exception as err:  # a damaged row group: each of its rows is rejected, the rest read on
            for j in range(i, i + n):
                yield _raw_row(e, f"{e.id_prefix}/{j}", "", file=e.path, error=str(err)[:300]), "corrupt_row_group"
            i += n
            continue
        for rec in rows:
            rid = f"{e.id_prefix}/{i}"
            i += 1
            if e.layout == "canonical":
                yield _canonical_parquet(e, rid, rec)
                continue
            raw = json.dumps({k: v for k, v in rec.items() if not _has_bytes(v)}, ensure_ascii=False, default=str)
            yield _sample(e, rid, rec, raw)


def _has_bytes(v) -> bool:
    if isinstance(v, bytes | bytearray):
        return True
    if isinstance(v, dict):
        return any(_has_bytes(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_bytes(x) for x in v)
    return False


def _canonical_parquet(e: Entry, rid: str, rec: dict):
    images = rec.get("images")
    if isinstance(images, list):  # `ivl export --format parquet`: HF Image structs {bytes, path}
        images = [b.get("bytes") if isinstance(b, dict) else b for b in images]
    if images is None or not all(isinstance(b, bytes) for b in images):
        return _raw_row(e, rec.get("id") or rid, "", file=e.path), "bad_image_field"
    return _canonical_sample(e, {**rec, "id": rec.get("id") or rid}, images)


READERS = {"jsonl": _read_jsonl, "json": _read_json_array, "tar": _read_tar, "parquet": _read_parquet}


def rows_to_tables(kept: list[dict], rejected: list[dict]) -> tuple[pa.Table, pa.Table]:
    k = pa.Table.from_pylist(kept, schema=CANONICAL) if kept else CANONICAL.empty_table()
    r = pa.Table.from_pylist(rejected, schema=REJECTED) if rejected else REJECTED.empty_table()
    return k, r
