"""Every input layout, written by the libraries that write it (datasets, webdataset) over real images:
each row and each image byte comes out, with unique ids; unsupported layouts fail at start."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import conv, read_bytes, write_jsonl

from pipeline.readers import ConfigError, entries_from_sources, plan_tasks, read_task


def read_all(sources, rows_per_shard=1000, **opts):
    kept, rejected = [], []
    for task in plan_tasks(entries_from_sources(sources, **opts), rows_per_shard):
        k, r = read_task(task)
        kept += k
        rejected += r
    return kept, rejected


@pytest.fixture
def imgs(sample_images):
    return [read_bytes(p) for p in sample_images[:4]]


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def test_llava_json_array_direct_and_from_meta(tmp_path, imgs):
    (tmp_path / "coco").mkdir()
    for i, b in enumerate(imgs[:2]):
        (tmp_path / "coco" / f"{i}.png").write_bytes(b)
    records = [  # llava_v1_5_mix665k.json's shape: id, image under the root, <image> in the first turn
        {"id": "000000033471", "image": "coco/0.png", "conversations": conv("<image>\nWhat is it?", "A drawing.")},
        {"id": "000000052846", "image": "coco/1.png", "conversations": conv("What colour?", "Red, [mostly], {bright}.")},
        {"id": "text-only", "conversations": conv("Say \"hi\", please.", "Hi, \u4f60\u597d.")},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records, indent=2, ensure_ascii=False))
    kept, rejected = read_all([str(tmp_path / "llava.json")], rows_per_shard=2)
    assert rejected == [] and [r["id"] for r in kept] == ["llava/0", "llava/1", "llava/2"]
    assert [r["images"] for r in kept] == [[imgs[0]], [imgs[1]], []]
    assert kept[1]["conversations"] == turns(("human", "<image>\nWhat colour?"), ("gpt", "Red, [mostly], {bright}."))
    assert [json.loads(r["meta"])["orig_id"] for r in kept] == ["000000033471", "000000052846", "text-only"]
    # the same file as a meta annotation (the issue: 6 records became 94 bad_json rows)
    (tmp_path / "meta.json").write_text(json.dumps({"mix": {"root": ".", "annotation": "llava.json", "repeat_time": 2}}))
    kept, rejected = read_all([str(tmp_path / "meta.json")])
    assert rejected == [] and len(kept) == 6 and kept[3]["id"] == "mix/0#r1"
    assert kept[0]["conversations"] == kept[3]["conversations"]


def test_json_array_broken_element_is_one_row(tmp_path):
    text = '[{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},\n' \
           ' {"conversations": [oops]},\n 7,\n {"conversations": [{"from": "human", "value": "cut'
    (tmp_path / "a.json").write_text(text)
    kept, rejected = read_all([str(tmp_path / "a.json")])
    assert len(kept) == 1
    assert [r["reject_reason"] for r in rejected] == ["ingest:bad_json", "ingest:bad_record", "ingest:bad_json"]
    assert json.loads(rejected[2]["meta"])["raw"].endswith('"value": "cut')


def test_openai_trl_messages_with_image_parts(tmp_path, imgs):
    (tmp_path / "a.png").write_bytes(imgs[0])
    data_uri = "data:image/png;base64," + base64.b64encode(imgs[1]).decode()
    write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},  # TRL: {type: image} takes the next of `images`
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A small drawing."}]}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare:"},
                                                    {"type": "image_url", "image_url": {"url": data_uri}},
                                                    {"type": "image", "image": "a.png"}]},
                      {"role": "assistant", "content": "They differ."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
    ])
    kept, rejected = read_all([str(tmp_path / "chat.jsonl")])
    assert [r["id"] for r in kept] == ["chat/0", "chat/1"]
    assert kept[0]["conversations"] == turns(("system", "Be brief."), ("human", "<image>\nWhat is it?"),
                                             ("gpt", "A small drawing."))
    assert kept[0]["images"] == [imgs[0]] and kept[1]["images"] == [imgs[1], imgs[0]]
    assert kept[1]["conversations"][0]["value"] == "Compare:\n<image>\n<image>"
    assert [r["reject_reason"] for r in rejected] == ["ingest:unknown_role"]


def test_llamafactory_sharegpt_with_images(tmp_path, imgs):
    (tmp_path / "mllm_demo_data").mkdir()
    for i, b in enumerate(imgs[:2]):
        (tmp_path / "mllm_demo_data" / f"{i}.png").write_bytes(b)
    sharegpt = [{"conversations": conv("<image>Who are they?", "Two drawings."), "images": ["mllm_demo_data/0.png"],
                 "system": "You are helpful."},
                {"conversations": conv("<image><image>Both?", "Yes."), "images": ["mllm_demo_data/0.png", "mllm_demo_data/1.png"]}]
    messages = [{"messages": [{"role": "user", "content": "<image>What is this?"},
                              {"role": "assistant", "content": "A drawing."}], "images": ["mllm_demo_data/1.png"]}]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    (tmp_path / "mllm_demo.json").write_text(json.dumps(messages))
    kept, rejected = read_all([str(tmp_path / "sharegpt.json"), str(tmp_path / "mllm_demo.json")])
    assert rejected == []
    assert [r["images"] for r in kept] == [[imgs[0]], imgs[:2], [imgs[1]]]
    assert kept[0]["conversations"][0] == {"from": "system", "value": "You are helpful."}
    assert kept[2]["conversations"] == turns(("human", "<image>What is this?"), ("gpt", "A drawing."))


def test_hf_parquet_image_images_and_path_only(tmp_path, imgs, sample_images):
    from datasets import Dataset, Features, Image, Sequence, Value

    turns_t = [{"from": Value("string"), "value": Value("string")}]
    one = Dataset.from_dict({"image": [{"bytes": imgs[0], "path": "a.png"}, None],
                             "conversations": [conv(), conv("Hi?", "Hello there.")]},
                            features=Features({"image": Image(), "conversations": turns_t}))
    one.to_parquet(str(tmp_path / "one.parquet"))
    many = Dataset.from_dict({"images": [[{"bytes": imgs[1], "path": "b.png"}, {"bytes": imgs[2], "path": "c.png"}]],
                              "messages": [[{"role": "user", "content": "<image><image>Same?"},
                                            {"role": "assistant", "content": "No."}]]},
                             features=Features({"images": Sequence(Image()), "messages": [{"role": Value("string"),
                                                                                           "content": Value("string")}]}))
    many.to_parquet(str(tmp_path / "many.parquet"))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "d.png").write_bytes(imgs[3])
    path_only = pa.table({"image": [{"bytes": None, "path": "pics/d.png"}], "conversations": [conv()]})
    pq.write_table(path_only, tmp_path / "paths.parquet")
    kept, rejected = read_all([str(tmp_path / n) for n in ("one.parquet", "many.parquet", "paths.parquet")])
    assert rejected == []
    assert [r["id"] for r in kept] == ["one/one/0", "one/one/1", "many/many/0", "paths/paths/0"]
    assert [r["images"] for r in kept] == [[imgs[0]], [], imgs[1:3], [imgs[3]]]
    assert kept[2]["conversations"] == turns(("human", "<image><image>Same?"), ("gpt", "No."))
    assert json.loads(kept[3]["meta"])["image_paths"] == [str(tmp_path / "pics" / "d.png")]


def test_the_cauldron_and_llava_onevision_in_a_hub_folder(tmp_path, imgs):
    from datasets import Dataset, Features, Image, Sequence, Value

    hub = tmp_path / "the_cauldron"
    text_t = [{"user": Value("string"), "assistant": Value("string"), "source": Value("string")}]
    feats = Features({"images": Sequence(Image()), "texts": text_t})
    for subset, rows in {
        "sroie": [([imgs[0]], [("What is the total?", "12.50", "sroie")]),
                  ([imgs[1]], [("Company?", "ACME", "sroie"), ("Date?", "2019-01-01", "sroie")])],
        "chrome_writting": [([imgs[2], imgs[3]], [("Read both.", "ab cd", "chrome")])],
    }.items():
        (hub / subset).mkdir(parents=True)
        Dataset.from_dict({"images": [[{"bytes": b, "path": None} for b in im] for im, _ in rows],
                           "texts": [[{"user": u, "assistant": a, "source": s} for u, a, s in t] for _, t in rows]},
                          features=feats).to_parquet(str(hub / subset / "train-00000-of-00001.parquet"))
    ov = tmp_path / "onevision"
    (ov / "CLEVR-Math(MathV360K)").mkdir(parents=True)
    Dataset.from_dict({"id": ["clevr/1"], "image": [{"bytes": imgs[0], "path": None}], "data_source": ["CLEVR-Math"],
                       "conversations": [conv("<image>\nHow many?", "3")]},
                      features=Features({"id": Value("string"), "image": Image(), "data_source": Value("string"),
                                         "conversations": [{"from": Value("string"), "value": Value("string")}]})
                      ).to_parquet(str(ov / "CLEVR-Math(MathV360K)" / "train-00000-of-00001.parquet"))
    kept, rejected = read_all([str(hub), str(ov)])
    assert rejected == []
    assert [r["id"] for r in kept] == [
        "the_cauldron/chrome_writting/train-00000-of-00001/0", "the_cauldron/sroie/train-00000-of-00001/0",
        "the_cauldron/sroie/train-00000-of-00001/1", "onevision/CLEVR-Math_MathV360K/train-00000-of-00001/0"]
    assert [r["source"] for r in kept][:2] == ["the_cauldron/chrome_writting", "the_cauldron/sroie"]
    assert kept[0]["images"] == imgs[2:4] and kept[1]["images"] == [imgs[0]] and kept[3]["images"] == [imgs[0]]
    assert kept[0]["conversations"] == turns(("human", "<image>\n<image>\nRead both."), ("gpt", "ab cd"))
    assert kept[2]["conversations"] == turns(("human", "<image>\nCompany?"), ("gpt", "ACME"), ("human", "Date?"),
                                             ("gpt", "2019-01-01"))
    assert json.loads(kept[2]["meta"])["text_sources"] == ["sroie", "sroie"]
    m = json.loads(kept[3]["meta"])
    assert m["orig_id"] == "clevr/1" and m["data_source"] == "CLEVR-Math"


def write_img2dataset(folder, imgs, captions, shard="00000"):
    """img2dataset's output: `<shard>.tar` (key.jpg/.txt/.json), `<shard>.parquet`, `<shard>_stats.json`."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    meta_rows = []
    with wds.TarWriter(str(folder / f"{shard}.tar")) as sink:
        for i, (b, cap) in enumerate(zip(imgs, captions)):
            key = f"{shard}{i:04d}"
            meta = {"url": f"https://example.org/{i}.png", "caption": cap, "key": key, "status": "success",
                    "error_message": None, "width": 448, "height": 448, "original_width": 500, "original_height": 500}
            sink.write({"__key__": key, "png": b, "txt": cap, "json": json.dumps(meta).encode()})
            meta_rows.append(meta)
    meta_rows.append({**meta_rows[0], "key": f"{shard}9999", "status": "failed_to_download", "caption": "lost"})
    pq.write_table(pa.Table.from_pylist(meta_rows), folder / f"{shard}.parquet")
    (folder / f"{shard}_stats.json").write_text(json.dumps({"count": len(meta_rows), "successes": len(imgs), "failed_to_download": 1}))


def test_img2dataset_folder_captions_become_answers(tmp_path, imgs):
    write_img2dataset(tmp_path / "laion", imgs[:3], ["a hen", "a magpie", "  "])
    skipped = []
    entries = entries_from_sources([str(tmp_path / "laion")], instruction="Caption this.", skipped=skipped)
    assert [(e.kind, e.layout) for e in entries] == [("tar", "caption")]
    assert [s["file"].endswith("00000.parquet") for s in skipped] == [True]
    kept, rejected = [], []
    for t in plan_tasks(entries, 100):
        k, r = read_task(t)
        kept, rejected = kept + k, rejected + r
    assert [r["id"] for r in kept] == ["laion/00000/000000000", "laion/00000/000000001"]
    assert [r["images"] for r in kept] == [[imgs[0]], [imgs[1]]]
    assert kept[0]["conversations"] == turns(("human", "<image>\nCaption this."), ("gpt", "a hen"))
    m = json.loads(kept[1]["meta"])
    assert m["url"] == "https://example.org/1.png" and m["orig_id"] == "000000001" and m["original_width"] == 500
    assert [r["reject_reason"] for r in rejected] == ["ingest:empty_caption"]


def test_webdataset_tar_gz_and_tgz_in_a_folder(tmp_path, imgs):
    import webdataset as wds

    d = tmp_path / "wds"
    d.mkdir()
    for name in ("shard-0.tar.gz", "shard-1.tgz", "shard-2.tar"):
        with wds.TarWriter(str(d / name), compress=name != "shard-2.tar") as sink:
            for i in range(4):
                sink.write({"__key__": f"s{i}", "png": imgs[i], "json": json.dumps({"conversations": conv()}).encode()})
    with tarfile.open(d / "shard-0.tar.gz") as t:  # really gzip, as the 11 lost samples were
        assert len(t.getnames()) == 8
    kept, rejected = read_all([str(d)])
    assert rejected == [] and len(kept) == 12 and len({r["id"] for r in kept}) == 12
    assert [r["images"][0] for r in kept] == imgs[:4] * 3
    assert kept[0]["id"] == "wds/shard-0/s0"


def test_ids_never_collide(tmp_path, imgs):
    d = tmp_path / "anns"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"conversations": conv("Q1?", "A1.")}])
    write_jsonl(d / "b.jsonl", [{"conversations": conv("Q2?", "A2.")}])
    kept, _ = read_all([str(d)])
    assert [r["id"] for r in kept] == ["anns/a/0", "anns/b/0"]
    for name in ("meta_a", "meta_b"):  # two meta files, one dataset name
        write_jsonl(tmp_path / f"{name}.jsonl", [{"conversations": conv(f"{name}?", "Yes.")}])
        (tmp_path / f"{name}.json").write_text(json.dumps({"caption": {"annotation": f"{name}.jsonl"}}))
    kept, _ = read_all([str(tmp_path / "meta_a.json"), str(tmp_path / "meta_b.json")])
    assert [r["id"] for r in kept] == ["meta_a/caption/0", "meta_b/caption/0"]
    assert [r["source"] for r in kept] == ["meta_a/caption", "meta_b/caption"]


def test_encodings_bom_and_declared(tmp_path):
    line = json.dumps({"conversations": conv("Caf\u00e9?", "Cr\u00e8me br\u00fbl\u00e9e.")}, ensure_ascii=False)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n" + line.encode() + b"\n")
    kept, rejected = read_all([str(tmp_path / "bom.jsonl")])
    assert len(kept) == 2 and rejected == []  # the BOM costs no row
    (tmp_path / "latin.jsonl").write_bytes(line.encode("latin-1") + b"\n")
    kept, rejected = read_all([str(tmp_path / "latin.jsonl")])
    assert kept == [] and [r["reject_reason"] for r in rejected] == ["ingest:bad_encoding"]
    assert "\\xe9" in json.loads(rejected[0]["meta"])["raw"]  # shown as escapes, never replaced
    kept, rejected = read_all([str(tmp_path / "latin.jsonl")], encoding="latin-1")
    assert rejected == [] and kept[0]["conversations"][1]["value"] == "Cr\u00e8me br\u00fbl\u00e9e."
    (tmp_path / "gbk.jsonl").write_bytes(json.dumps({"conversations": conv("\u4f60\u597d?", "\u4f60\u597d\u3002")},
                                                    ensure_ascii=False).encode("gbk") + b"\n")
    (tmp_path / "m.json").write_text(json.dumps({"zh": {"annotation": "gbk.jsonl", "encoding": "gbk"}}))
    kept, rejected = read_all([str(tmp_path / "m.json")])
    assert rejected == [] and kept[0]["conversations"][0]["value"] == "\u4f60\u597d?"
    with pytest.raises(ConfigError, match="not ASCII-compatible"):
        entries_from_sources([str(tmp_path / "bom.jsonl")], encoding="utf-16")


def test_video_entries_are_rejected(tmp_path, imgs):
    (tmp_path / "a.png").write_bytes(imgs[0])
    write_jsonl(tmp_path / "v.jsonl", [
        {"video": "clip.mp4", "conversations": conv("<video>\nWhat happens?", "A bird flies.")},
        {"image": "a.png", "conversations": conv()},
    ])
    kept, rejected = read_all([str(tmp_path / "v.jsonl")])
    assert len(kept) == 1 and [r["reject_reason"] for r in rejected] == ["ingest:video_unsupported"]


def put(uri: str, data: bytes) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def assert_remote_read(path, present: str, missing: str, image: bytes) -> None:
    """A line whose remote image exists is kept with its bytes; one whose image is gone names the URI."""
    write_jsonl(path, [{"image": present, "conversations": conv()}, {"image": missing, "conversations": conv()}])
    kept, rejected = read_all([str(path)], remote_images=True)
    assert [r["images"] for r in kept] == [[image]]
    assert [r["reject_reason"] for r in rejected] == ["ingest:missing_image"]
    assert json.loads(rejected[0]["meta"])["uri"] == missing


def test_remote_images_rejected_unless_configured(tmp_path, imgs, s3_bucket):
    write_jsonl(tmp_path / "r.jsonl", [{"image": f"{s3_bucket}/x/a.png", "conversations": conv()},
                                       {"image": "https://example.org/b.png", "conversations": conv()}])
    _, rejected = read_all([str(tmp_path / "r.jsonl")])
    assert [r["reject_reason"] for r in rejected] == ["ingest:remote_image"] * 2
    assert [json.loads(r["meta"])["uri"] for r in rejected] == [f"{s3_bucket}/x/a.png", "https://example.org/b.png"]
    put(f"{s3_bucket}/x/a.png", imgs[0])
    assert_remote_read(tmp_path / "s3.jsonl", f"{s3_bucket}/x/a.png", f"{s3_bucket}/x/missing.png", imgs[0])


def test_sources_on_s3(imgs, s3_bucket):
    """A meta file, its JSONL and images, a JSON array and a hub folder of Parquet subsets, all on S3."""
    root = f"{s3_bucket}/data"
    for i, b in enumerate(imgs[:2]):
        put(f"{root}/images/{i}.png", b)
    lines = [{"id": "a", "image": "0.png", "conversations": conv()}, {"conversations": conv("Hi?", "Hello.")}]
    put(f"{root}/ann.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    put(f"{root}/meta.json", json.dumps({"cap": {"root": "images", "annotation": "ann.jsonl", "repeat_time": 2}}).encode())
    put(f"{root}/llava.json", json.dumps([{"image": "images/1.png", "conversations": conv()}]).encode())
    for subset in ("sroie", "chrome"):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"images": [[{"bytes": imgs[0], "path": None}]],
                                 "texts": [[{"user": "Q?", "assistant": subset, "source": subset}]]}), sink)
        put(f"{s3_bucket}/hub/{subset}/train-00000-of-00001.parquet", sink.getvalue().to_pybytes())
    kept, rejected = read_all([f"{root}/meta.json", f"{root}/llava.json", f"{s3_bucket}/hub"], rows_per_shard=1)
    assert rejected == []
    assert [r["id"] for r in kept] == ["cap/0", "cap/1", "cap/0#r1", "cap/1#r1", "llava/0",
                                       "hub/chrome/train-00000-of-00001/0", "hub/sroie/train-00000-of-00001/0"]
    assert [r["images"] for r in kept] == [[imgs[0]], [], [imgs[0]], [], [imgs[1]], [imgs[0]], [imgs[0]]]
    assert kept[5]["conversations"][1]["value"] == "chrome"


def test_https_images_through_fsspec(tmp_path, imgs):
    import functools
    import http.server
    import threading

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.png").write_bytes(imgs[2])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert_remote_read(tmp_path / "h.jsonl", f"{base}/a.png", f"{base}/gone.png", imgs[2])
    finally:
        server.shutdown()


def test_forced_input_format(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": "Hi?"},
                                                     {"role": "assistant", "content": "Hello."}]}])
    kept, _ = read_all([str(tmp_path / "x.jsonl")], input_format="messages")
    assert kept[0]["conversations"] == turns(("human", "Hi?"), ("gpt", "Hello."))
    _, rejected = read_all([str(tmp_path / "x.jsonl")], input_format="internvl")
    assert [r["reject_reason"] for r in rejected] == ["ingest:empty_conversation"]  # forced: read as told


@pytest.mark.parametrize("name,content,found", [
    ("trl.jsonl", '{"prompt": "a", "completion": "b"}\n', "records with keys ['completion', 'prompt']"),
    ("arr.json", '[{"question": "q", "answer": "a"}]', "elements with keys ['answer', 'question']"),
    ("info.json", '{"version": 1}', "not an InternVL meta file"),
    ("notes.txt", "hello", "unsupported file type"),
])
def test_unsupported_layout_fails_at_start(tmp_path, name, content, found):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match="supported:") as err:
        entries_from_sources([str(tmp_path / name)])
    assert name in str(err.value) and found in str(err.value)


def test_cli_unsupported_layout_is_one_line_before_ray(tmp_path):
    (tmp_path / "trl.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "ingest", str(tmp_path / "trl.jsonl"), "--out", str(tmp_path / "o"),
                        "--output-format", "parquet"], capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "trl.jsonl: unsupported layout" in p.stderr  # no Ray line before it
    assert took < 10, f"{took:.1f}s"  # generous: Ray is never started (measured ~1 s on an idle machine)
    assert not (tmp_path / "o").exists()
