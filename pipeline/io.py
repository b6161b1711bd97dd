"""Shard files: listing inputs, atomic Parquet/WebDataset writes, completion markers, on local disk or any
storage `pyarrow.fs` understands (`s3://`, `gs://`, `hdfs://`, `file://`).

Every job writes `OUT/kept/`, `OUT/rejected/` (curate adds `OUT/review/`) and `OUT/report/`. A unit of
work (one input chunk) writes its files under deterministic names derived from its input, each committed
atomically, then a marker `OUT/_done/<key>.json` holding its counts; a rerun skips keys whose marker exists,
so a killed job resumes and ends with the same files as an uninterrupted run.

Paths. A local path stays a plain path (os calls, temp file + fsync + rename). Anything with `scheme://`
goes through `pyarrow.fs.FileSystem.from_uri`; S3 takes its endpoint and credentials from the standard
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE), which also
reach Ray's workers, or from pyarrow's URI query parameters (`?endpoint_override=host:port&scheme=http`),
which every helper here keeps on the paths it derives. Jobs do all file I/O of a job folder through the
functions below, so a cluster's workers write to shared storage, never to their own disks.

Atomic commit on object stores (S3, GCS): an object becomes visible only when its upload completes (one
PUT, or CompleteMultipartUpload for a large one), so a file is written straight to its final key from
bytes held in memory: a killed writer leaves no object at all. A temp key + `move` would not help there:
pyarrow's S3 `move` is a copy then a delete, not atomic and twice the bytes. Other filesystems (HDFS, ...)
get the local scheme: a temp file in the same folder, then `move` (a rename).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.schema import CANONICAL, conform

SHARD_SUFFIXES = (".parquet", ".tar")
DEFAULT_ROWS_PER_SHARD = 1000
DEFAULT_BYTES_PER_SHARD = 256 << 20
_OBJECT_STORES = ("s3", "gs", "gcs")


# ---- paths and URIs ------------------------------------------------------------------------------

def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (s3, gs, hdfs, file, ...); a plain path is local."""
    return "://" in str(path)


def _split_query(path: str) -> tuple[str, str]:
    head, sep, query = path.partition("?")
    return head, sep + query


def strip_query(path: str | os.PathLike) -> str:
    """The path without pyarrow's `?option=...` part (what its name and suffix are read from)."""
    return _split_query(str(path))[0]


def has_suffix(path: str | os.PathLike, suffixes: str | tuple[str, ...]) -> bool:
    return strip_query(path).endswith(suffixes)


def join(base: str | os.PathLike, *parts: str) -> str:
    """os.path.join for local paths; for a URI, parts joined with '/' before its query string."""
    base = str(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, query = _split_query(base)
    for part in parts:
        head = head.rstrip("/") + "/" + part.strip("/") if part else head
    return head + query


def dirname(path: str | os.PathLike) -> str:
    path = str(path)
    if not is_uri(path):
        return os.path.dirname(path)
    head, query = _split_query(path)
    return posixpath.dirname(head.rstrip("/")) + query


def basename(path: str | os.PathLike) -> str:
    return posixpath.basename(strip_query(path).rstrip("/")) if is_uri(path) else os.path.basename(str(path))


def abspath(path: str | os.PathLike) -> str:
    """os.path.abspath for a local path; a URI is already absolute (normpath would turn `s3://` into `s3:/`)."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def relpath(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """`path` relative to the folder `start` (both local, or both URIs on the same storage)."""
    if not is_uri(path):
        return os.path.relpath(path, start)
    p, s = strip_query(path), strip_query(start).rstrip("/") + "/"
    if not p.startswith(s):
        raise ValueError(f"{path} is not under {start}")
    return p[len(s):]


def _is_local(path: str) -> bool:
    return not is_uri(path) or path.startswith("file://")


def _local(path: str) -> str:
    return strip_query(path)[len("file://"):] if path.startswith("file://") else path


@functools.lru_cache(maxsize=64)
def _object_store(scheme: str, bucket: str, query: str, endpoint_env: str | None) -> pafs.FileSystem:
    """One client per bucket and options (from_uri looks the bucket's region up: once, not per file)."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}{query}")[0]


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    uri = str(uri)
    if _is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(_local(uri))
    head, query = _split_query(uri)
    scheme, rest = head.split("://", 1)
    if scheme in _OBJECT_STORES:
        bucket = rest.split("/", 1)[0]
        return _object_store(scheme, bucket, query, os.environ.get("AWS_ENDPOINT_URL")), rest.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def _info(path: str) -> pafs.FileInfo:
    fs, p = resolve(path)
    return fs.get_file_info(p)


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    return os.path.exists(path) if not is_uri(path) else _info(path).type != pafs.FileType.NotFound


def isdir(path: str | os.PathLike) -> bool:
    path = str(path)
    return os.path.isdir(path) if not is_uri(path) else _info(path).type == pafs.FileType.Directory


def isfile(path: str | os.PathLike) -> bool:
    path = str(path)
    return os.path.isfile(path) if not is_uri(path) else _info(path).type == pafs.FileType.File


def size_and_mtime(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes, modification time in ns) of a file: an input's fingerprint for resume checks."""
    path = str(path)
    if not is_uri(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    info = _info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(path)
    return info.size, info.mtime_ns or 0


def list_files(folder: str | os.PathLike, suffixes: str | tuple[str, ...] = SHARD_SUFFIXES,
               recursive: bool = True, hidden: bool = False) -> list[str]:
    """Files under `folder` ending in one of `suffixes`, sorted, skipping names that start with '.' or '_'
    (temp files, markers) unless `hidden`; [] if the folder does not exist."""
    folder = str(folder)
    skip = () if hidden else (".", "_")
    if not is_uri(folder):
        p = Path(folder)
        if not p.is_dir():
            return []
        found = p.rglob("*") if recursive else p.iterdir()
        return sorted(str(f) for f in found if f.name.endswith(suffixes) and not (skip and f.name.startswith(skip))
                      and f.is_file())
    fs, root = resolve(folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=recursive)):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and name.endswith(suffixes) and not (skip and name.startswith(skip)):
            out.append(join(folder, info.path[len(root):].lstrip("/")))
    return sorted(out)


def open_input(path: str | os.PathLike) -> IO[bytes]:
    """A seekable binary file (Parquet footers, tar streams, images) from a local path or a URI."""
    path = str(path)
    if not is_uri(path):
        return open(path, "rb")
    fs, p = resolve(path)
    return fs.open_input_file(p)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def local_dir(path: str | os.PathLike) -> str:
    """A local folder with the files of `path` (for libraries that only read local folders, e.g. a saved
    tokenizer): `path` itself when local, else a copy in a fresh temp folder (top-level files only)."""
    path = str(path)
    if _is_local(path):
        return _local(path)
    local = tempfile.mkdtemp(prefix="ivl-copy-")
    for f in list_files(path, "", recursive=False, hidden=True):
        with open(os.path.join(local, basename(f)), "wb") as out:
            out.write(read_bytes(f))
    return local


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[str]:
    """A local folder to write into whose files end up in `path`: `path` itself when local, else a temp
    folder whose top-level files are each committed to `path` on exit."""
    path = str(path)
    if _is_local(path):
        os.makedirs(_local(path), exist_ok=True)
        yield _local(path)
        return
    with tempfile.TemporaryDirectory(prefix="ivl-stage-") as local:
        yield local
        for name in sorted(os.listdir(local)):
            if os.path.isfile(os.path.join(local, name)):
                with open(os.path.join(local, name), "rb") as f:
                    atomic_write_bytes(join(path, name), f.read())


def makedirs(path: str | os.PathLike) -> None:
    """Create a folder and its parents (exist_ok); on an object store, a folder marker object."""
    path = str(path)
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def remove(path: str | os.PathLike) -> None:
    """Delete one file; a missing one is not an error."""
    path = str(path)
    try:
        if not is_uri(path):
            os.remove(path)
        else:
            fs, p = resolve(path)
            fs.delete_file(p)
    except FileNotFoundError:
        pass


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder and everything under it; a missing one is not an error."""
    path = str(path)
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def list_input_shards(path: str | os.PathLike) -> list[str]:
    """Shards of an `--in`: a job's OUT (reads OUT/kept/), a folder of shards, or one shard file."""
    path = str(path)
    if isfile(path):
        return [path]
    if not isdir(path):
        raise FileNotFoundError(f"input {path} does not exist")
    if isdir(join(path, "kept")):
        path = join(path, "kept")
    files = list_files(path, SHARD_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .parquet or .tar shards under {path}")
    return files


def shard_key(path: str) -> str:
    """A file's stem: the key that names its outputs and its marker."""
    name = basename(path)
    for suf in SHARD_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


# ---- markers -------------------------------------------------------------------------------------

def marker_path(out_dir: str, key: str) -> str:
    return join(out_dir, "_done", f"{key}.json")


def read_marker(out_dir: str, key: str) -> dict | None:
    try:
        return json.loads(read_bytes(marker_path(out_dir, key)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(out_dir: str, key: str, payload: dict) -> None:
    atomic_write_bytes(marker_path(out_dir, key), json.dumps(payload, sort_keys=True).encode())


# ---- atomic writes -------------------------------------------------------------------------------

def atomic_write_bytes(path: str, data: bytes) -> None:
    """Commit `data` as the file `path` all at once: readers see the old file (or none) or all of it."""
    path = str(path)
    if _is_local(path):
        path = _local(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, p = resolve(path)
    if strip_query(path).split("://", 1)[0] in _OBJECT_STORES:
        with fs.open_output_stream(p) as f:  # the object appears when the upload completes (module doc)
            f.write(data)
        return
    fs.create_dir(posixpath.dirname(p), recursive=True)
    tmp = posixpath.join(posixpath.dirname(p), f".tmp-{os.getpid()}-{posixpath.basename(p)}")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


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


def write_shards(table: pa.Table, folder: str, key: str, fmt: str, rows_per_shard: int,
                 input_rows: pa.Array | None = None) -> list[str]:
    """Write `table` as `folder/<key>-<part>.<ext>` files; returns their paths (none for an empty table).
    With `input_rows` (each row's position in the input shard `key`, ascending) a part is named by the
    input rows it spans instead, `<key>-r<first>-<last>`, so every file says where its rows came from."""
    paths, start = [], 0
    for i, part in enumerate(split_table(table, rows_per_shard)):
        ext = "parquet" if fmt == "parquet" else "tar"
        name = f"{key}-{i:03d}"
        if input_rows is not None:
            name = f"{key}-r{input_rows[start].as_py():07d}-{input_rows[start + part.num_rows - 1].as_py():07d}"
            start += part.num_rows
        path = join(folder, f"{name}.{ext}")
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
    with open_input(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
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
    if has_suffix(path, ".parquet"):
        if not is_uri(path):
            return conform(pq.read_table(path))
        fs, p = resolve(path)
        return conform(pq.read_table(p, filesystem=fs))
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
    for path in paths:
        try:
            if has_suffix(path, ".parquet"):
                with open_input(path) as f:
                    pq.ParquetFile(f).metadata  # noqa: B018  (reading the footer is the check)
            elif has_suffix(path, (".tar", ".tar.gz", ".tgz")):
                with open_input(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                    for _member in tar:
                        pass
        except Exception as e:  # pyarrow and tarfile raise many kinds for damaged files
            raise ValueError(f"unreadable input shard {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
