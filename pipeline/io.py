"""Shard files: listing inputs, atomic Parquet/WebDataset writes, completion markers.

Every job writes `OUT/kept/`, `OUT/rejected/` (curate adds `OUT/review/`) and `OUT/report/`. A unit of
work (one input chunk) writes its files under deterministic names derived from its input, each via a
temp file + rename, then a marker `OUT/_done/<key>.json` holding its counts; a rerun skips keys whose
marker exists, so a killed job resumes and ends with the same files as an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import CANONICAL, conform

SHARD_SUFFIXES = (".parquet", ".tar")
DEFAULT_ROWS_PER_SHARD = 1000
DEFAULT_BYTES_PER_SHARD = 256 << 20


def list_input_shards(path: str | os.PathLike) -> list[str]:
    """Shards of an `--in`: a job's OUT (reads OUT/kept/), a folder of shards, or one shard file."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    if (p / "kept").is_dir():
        p = p / "kept"
    files = sorted(str(f) for f in p.rglob("*") if f.suffix in SHARD_SUFFIXES and not f.name.startswith((".", "_")))
    if not files:
        raise FileNotFoundError(f"no .parquet or .tar shards under {p}")
    return files


def shard_key(path: str) -> str:
    """A file's stem: the key that names its outputs and its marker."""
    name = os.path.basename(path)
    for suf in SHARD_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


# ---- markers -------------------------------------------------------------------------------------

def marker_path(out_dir: str, key: str) -> str:
    return os.path.join(out_dir, "_done", f"{key}.json")


def read_marker(out_dir: str, key: str) -> dict | None:
    try:
        with open(marker_path(out_dir, key)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(out_dir: str, key: str, payload: dict) -> None:
    atomic_write_bytes(marker_path(out_dir, key), json.dumps(payload, sort_keys=True).encode())


def all_markers(out_dir: str) -> list[dict]:
    d = os.path.join(out_dir, "_done")
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                out.append(json.load(f))
    return out


# ---- atomic writes -------------------------------------------------------------------------------

def atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def split_table(table: pa.Table, rows_per_shard: int, bytes_per_shard: int = DEFAULT_BYTES_PER_SHARD) -> list[pa.Table]:
    """Cut a table into parts of at most rows_per_shard rows and about bytes_per_shard bytes."""
    if table.num_rows == 0:
        return []
    per_row = max(1, table.nbytes // table.num_rows)
    step = max(1, min(rows_per_shard, bytes_per_shard // per_row))
    return [table.slice(i, step) for i in range(0, table.num_rows, step)]


def write_shards(table: pa.Table, folder: str, key: str, fmt: str, rows_per_shard: int) -> list[str]:
    """Write `table` as `folder/<key>-<part>.<ext>` files; returns their paths (none for an empty table)."""
    paths = []
    for i, part in enumerate(split_table(table, rows_per_shard)):
        ext = "parquet" if fmt == "parquet" else "tar"
        path = os.path.join(folder, f"{key}-{i:03d}.{ext}")
        if fmt == "parquet":
            write_parquet_atomic(part, path)
        else:
            atomic_write_bytes(path, table_to_tar(part))
        paths.append(path)
    return paths


# ---- WebDataset ----------------------------------------------------------------------------------

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def image_ext(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "bin")


def table_to_tar(table: pa.Table) -> bytes:
    """Canonical rows as a WebDataset tar: `<n>.json` (every non-image column) and `<n>.<i>.<ext>`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, row in enumerate(table.to_pylist()):
            key = f"{n:08d}"
            images = row.pop("images") or []
            members = [(f"{key}.json", json.dumps(row, ensure_ascii=False).encode())]
            members += [(f"{key}.{i}.{image_ext(b)}", b) for i, b in enumerate(images)]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: byte-identical reruns
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Group a tar's members by WebDataset key (the basename up to its first dot).

    Yields (key, {suffix: bytes}, problem). Links, absolute paths and `..` members are never
    followed or extracted; they are reported as the sample's problem. A truncated tar raises
    tarfile.ReadError after the samples read so far."""
    current, files, problem = None, {}, None
    with tarfile.open(path, mode="r|*") as tar:
        for m in tar:
            if m.isdir():
                continue
            name = m.name
            base = os.path.basename(name)
            key = os.path.join(os.path.dirname(name), base.split(".", 1)[0])
            if key != current and current is not None:
                yield current, files, problem
                files, problem = {}, None
            current = key
            if not m.isfile():
                problem = f"tar member {name!r} is a link or special file"
                continue
            if os.path.isabs(name) or ".." in name.split("/"):
                problem = f"tar member {name!r} has an unsafe path"
                continue
            suffix = base.split(".", 1)[1] if "." in base else ""
            f = tar.extractfile(m)
            files[suffix] = f.read() if f else b""
    if current is not None:
        yield current, files, problem


def read_canonical(path: str) -> pa.Table:
    """Read one canonical shard (Parquet or a tar written by `table_to_tar`)."""
    if path.endswith(".parquet"):
        return conform(pq.read_table(path))
    rows = []
    for _key, files, _problem in iter_tar_samples(path):
        row = json.loads(files.get("json", b"{}"))
        idx = sorted((int(s.split(".")[0]), s) for s in files if s.split(".")[0].isdigit() and s.split(".")[-1] in IMAGE_EXTS)
        row["images"] = [files[s] for _i, s in idx]
        rows.append(row)
    if not rows:
        return CANONICAL.empty_table()
    return conform(pa.Table.from_pylist(rows))


def check_readable(paths: list[str]) -> None:
    """Fail fast on a truncated or corrupt shard: Parquet footers and tar headers are read up front and
    the first bad file is named in one line (the default instead reports it as a rejected row)."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            if path.endswith(".parquet"):
                pq.ParquetFile(path).metadata  # noqa: B018  (reading the footer is the check)
            elif path.endswith((".tar", ".tar.gz", ".tgz")):
                with tarfile.open(path, mode="r|*") as tar:
                    for _member in tar:
                        pass
        except Exception as e:  # pyarrow and tarfile raise many kinds for damaged files
            raise ValueError(f"unreadable input shard {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
