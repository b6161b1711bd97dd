"""Storage URIs (pipeline/io.py through pyarrow.fs) against a real S3-compatible server (moto) on 127.0.0.1:
the same files, markers and commit semantics on s3:// as on a local folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io as sio
from pipeline.schema import rows_to_table


def all_markers(out_dir: str) -> list[dict]:
    """Every marker under OUT/_done/, read through pipeline.io (local or s3://)."""
    return [json.loads(sio.read_bytes(f)) for f in sio.list_files(sio.join(out_dir, "_done"), ".json", recursive=False)]


def sample_table(n: int, start: int = 0) -> pa.Table:
    rows = [{"id": f"src/{i}", "source": "src", "category": "general",
             "conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}],
             "images": [b"\x89PNG\r\n\x1a\n" + bytes([i % 256]) * 40] if i % 2 else [], "meta": "{}"}
            for i in range(start, start + n)]
    return rows_to_table(rows)


def test_uri_paths_keep_scheme_and_query():
    base = "s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http"
    p = sio.join(base, "kept", "a-000.parquet")
    assert p == "s3://bucket/run/kept/a-000.parquet?endpoint_override=127.0.0.1:9000&scheme=http"
    assert sio.basename(p) == "a-000.parquet" and sio.shard_key(p) == "a-000"
    assert sio.dirname(p) == sio.join(base, "kept") and sio.relpath(p, base) == "kept/a-000.parquet"
    assert sio.has_suffix(p, ".parquet") and sio.abspath(p) == p
    assert sio.join("s3://bucket/", "x") == "s3://bucket/x"
    assert sio.join("/tmp/a", "b") == "/tmp/a/b" and not sio.is_uri("/tmp/a")  # local paths stay plain


def test_shards_and_markers_on_s3_equal_local(s3_bucket, tmp_path):
    table = sample_table(25)
    outs = {"local": str(tmp_path / "out"), "s3": f"{s3_bucket}/run/out"}
    files = {}
    for name, out in outs.items():
        for fmt in ("parquet", "webdataset"):
            written = sio.write_shards(table, sio.join(out, "kept"), f"k-{fmt}", fmt, rows_per_shard=10)
            assert len(written) == 3
        sio.write_marker(out, "k", {"key": "k", "input": 25, "files": [sio.relpath(f, out) for f in written]})
        files[name] = sio.list_input_shards(out)  # OUT -> OUT/kept
    assert [sio.relpath(f, outs["s3"]) for f in files["s3"]] == [sio.relpath(f, outs["local"]) for f in files["local"]]
    for local, remote in zip(files["local"], files["s3"]):
        assert sio.read_bytes(remote) == sio.read_bytes(local)  # byte-identical objects
        assert sio.read_canonical(remote).equals(sio.read_canonical(local))
    back = pa.concat_tables(sio.read_canonical(f) for f in files["s3"] if f.endswith(".parquet"))
    assert back.column("id").to_pylist() == table.column("id").to_pylist()
    assert sio.read_marker(outs["s3"], "k") == sio.read_marker(outs["local"], "k")
    assert sio.read_marker(outs["s3"], "missing") is None
    assert all_markers(outs["s3"]) == all_markers(outs["local"])
    sio.check_readable(files["s3"])
    assert sio.list_input_shards(files["s3"][0]) == [files["s3"][0]]  # one shard file
    with pytest.raises(FileNotFoundError):
        sio.list_input_shards(f"{s3_bucket}/nothing-here")


def test_query_string_options_reach_the_server(s3_bucket, s3_server):
    """Endpoint options in the URI itself (pyarrow's `?endpoint_override=`) instead of AWS_ENDPOINT_URL."""
    host = s3_server.split("://", 1)[1]
    out = f"{s3_bucket}/q?endpoint_override={host}&scheme=http"
    sio.write_shards(sample_table(5), sio.join(out, "kept"), "k", "parquet", 10)
    sio.write_marker(out, "k", {"n": 5})
    (shard,) = sio.list_input_shards(out)
    assert shard == sio.join(out, "kept", "k-000.parquet") and sio.read_canonical(shard).num_rows == 5
    assert all_markers(out) == [{"n": 5}]


def test_corrupt_shard_on_s3_is_named(s3_bucket):
    good = f"{s3_bucket}/in/a.parquet"
    sio.write_parquet_atomic(sample_table(3), good)
    data = sio.read_bytes(good)
    sio.atomic_write_bytes(f"{s3_bucket}/in/b.parquet", data[: len(data) // 2])  # truncated: no footer
    sio.atomic_write_bytes(f"{s3_bucket}/in/c.tar", sio.table_to_tar(sample_table(3))[:700])
    with pytest.raises(ValueError, match="unreadable input shard s3://.*/in/b.parquet"):
        sio.check_readable(sio.list_input_shards(f"{s3_bucket}/in"))
    with pytest.raises(tarfile.ReadError):
        list(sio.iter_tar_samples(f"{s3_bucket}/in/c.tar"))


def test_folders_remove_and_info(s3_bucket):
    d = f"{s3_bucket}/x/_tokens"
    assert not sio.exists(d) and sio.list_files(d) == []
    sio.makedirs(d)
    assert sio.isdir(d)
    for i in range(3):
        sio.atomic_write_bytes(sio.join(d, f"{i:05d}.parquet"), b"abc")
    sio.atomic_write_bytes(sio.join(d, ".tmp-1-x.parquet"), b"partial")  # hidden: never listed
    assert [sio.basename(f) for f in sio.list_files(d)] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert sio.isfile(sio.join(d, "00001.parquet")) and sio.size_and_mtime(sio.join(d, "00001.parquet"))[0] == 3
    sio.remove(sio.join(d, "00001.parquet"))
    sio.remove(sio.join(d, "00001.parquet"))  # missing: not an error
    assert len(sio.list_files(d)) == 2
    sio.remove_tree(d)
    assert not sio.exists(sio.join(d, "00000.parquet")) and sio.list_files(d) == []
    sio.remove_tree(d)


def test_local_copies_of_remote_folders(s3_bucket):
    """For libraries that read and write only local folders (a saved tokenizer): staged_dir commits what is
    written into it, local_dir gives it back as local files."""
    uri = f"{s3_bucket}/out/tokenizer"
    with sio.staged_dir(uri) as d:
        assert not sio.is_uri(d)
        for name, data in (("tokenizer.json", b"{}"), (".hidden", b"x"), ("vocab.txt", b"a\nb")):
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    assert [sio.basename(f) for f in sio.list_files(uri, "", hidden=True)] == [".hidden", "tokenizer.json", "vocab.txt"]
    assert [sio.basename(f) for f in sio.list_files(uri, "")] == ["tokenizer.json", "vocab.txt"]
    back = sio.local_dir(uri)
    assert sorted(os.listdir(back)) == [".hidden", "tokenizer.json", "vocab.txt"]
    assert open(os.path.join(back, "vocab.txt"), "rb").read() == b"a\nb"
    assert sio.local_dir("/tmp/x") == "/tmp/x"


KILLED_WRITER = """
import os, sys
import pyarrow.fs as pafs
fs, path = pafs.FileSystem.from_uri(sys.argv[1])
f = fs.open_output_stream(path)
f.write(os.urandom(int(sys.argv[2])))  # parts of a multipart upload may already be on the server
f.flush()
os._exit(9)  # killed before close(): the upload is never completed
"""


@pytest.mark.parametrize("size", [1000, 12 << 20])  # one PUT; a multipart upload (parts of 5-10 MiB)
def test_killed_writer_leaves_no_object(s3_bucket, size):
    """The commit point of an object store: a writer killed mid-upload leaves nothing a reader can see,
    which is why io.atomic_write_bytes writes straight to the final key there."""
    uri = f"{s3_bucket}/out/kept/x-000.parquet"
    p = subprocess.run([sys.executable, "-c", KILLED_WRITER, uri, str(size)], env=os.environ.copy(), timeout=120)
    assert p.returncode == 9
    assert not sio.exists(uri) and sio.list_files(f"{s3_bucket}/out/kept") == []
    sio.atomic_write_bytes(uri, b"whole")  # and a rerun commits it
    assert sio.read_bytes(uri) == b"whole"


def test_parquet_written_to_s3_reads_with_plain_pyarrow(s3_bucket):
    """What io writes is an ordinary object: pyarrow (and so Ray Data) reads it by URI alone."""
    uri = f"{s3_bucket}/plain/a.parquet"
    sio.write_parquet_atomic(sample_table(4), uri)
    assert pq.read_table(uri).column("id").to_pylist() == [f"src/{i}" for i in range(4)]


def data_files(out: str) -> dict[str, bytes]:
    """Every data file a job committed under kept/, rejected/ and review/, by relative name."""
    return {sio.relpath(f, out): sio.read_bytes(f) for split in ("kept", "rejected", "review")
            for f in sio.list_files(sio.join(out, split), (".parquet", ".tar"))}


COUNTS = ("input", "kept", "rejected", "review", "samples", "packs")


@pytest.mark.slow
def test_chain_on_s3_equals_local(ray_local, s3_bucket, sample_meta, gguf, tmp_path):
    """ingest -> curate -> pack with every --out and --in on s3:// (moto): the same files, byte for byte,
    and the same counts as the same chain on a local folder."""
    from pipeline.curate import load_curate_config, run_curate
    from pipeline.ingest import run_ingest
    from pipeline.pack_job import run_pack

    runs = {"local": str(tmp_path), "s3": f"{s3_bucket}/runs"}
    summaries = {}
    for name, root in runs.items():
        ing, cur, pk = (sio.join(root, n) for n in ("ingest", "curate", "pack"))
        summaries[name] = [run_ingest([sample_meta], ing), run_curate(ing, cur, load_curate_config(None)),
                           run_pack(cur, pk, gguf, max_tokens=4096, max_tiles=24)]
        assert json.loads(sio.read_bytes(sio.join(pk, "report", "summary.json")))["packs"] == summaries[name][2]["packs"]
    for local, remote in zip(summaries["local"], summaries["s3"]):
        assert {k: remote.get(k) for k in COUNTS} == {k: local.get(k) for k in COUNTS}
    for stage in ("ingest", "curate", "pack"):
        local, remote = data_files(sio.join(runs["local"], stage)), data_files(sio.join(runs["s3"], stage))
        assert local and sorted(remote) == sorted(local), stage
        assert all(remote[k] == local[k] for k in local), stage
    from train.data import ShardReader, data_fingerprint, list_shards, shard_row_counts

    local, remote = (list_shards(sio.join(r, "pack")) for r in (runs["local"], runs["s3"]))  # training reads
    counts = shard_row_counts(remote)
    assert counts == shard_row_counts(local) and data_fingerprint(remote, counts) == data_fingerprint(local, counts)
    assert ShardReader().read_row(remote[-1], counts[-1] - 1) == ShardReader().read_row(local[-1], counts[-1] - 1)
    from pipeline.html_report import write_job_report  # what the CLI writes after each job

    page = sio.read_text(write_job_report(sio.join(runs["s3"], "curate")))
    assert page.startswith("<!doctype html>") and "data:image/png" in page and "examples rejected" in page
    assert not os.path.exists("s3:")  # nothing went to a local folder named after the URI
