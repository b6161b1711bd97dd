"""Dedup through a real local Ray: planted duplicates in real text (Python docs, tests/data)."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray.data import ExecutionResources

from pipeline.dedup_stage import (
    DedupConfig,
    StoreBytes,
    decisions_by_shard,
    dedup_dataset,
    dedup_decisions,
    row_keys,
)
from pipeline.schema import rows_to_table

DATA = Path(__file__).parent / "data" / "dedup_python_docs.jsonl.gz"


def _docs() -> list[list[str]]:
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        return [json.loads(line)["paragraphs"] for line in f]


def _row(rid: str, paragraphs: list[str], **extra) -> dict:
    conv = [{"from": "human", "value": "Explain this part of the Python library."}, {"from": "gpt", "value": "\n\n".join(paragraphs)}]
    return {"id": rid, "source": "pydocs", "category": "general", "conversations": conv, "images": [], "meta": "{}", **extra}


def _one_in_fifty(paragraphs: list[str], rng: random.Random) -> list[str]:
    words = "\n\n".join(paragraphs).split(" ")
    for k in range(rng.randrange(50), len(words), 50):
        words[k] = rng.choice(["alpha", "kernel", "orange", "vector", "module"])
    return " ".join(words).split("\n\n")


def _whitespace_case(paragraphs: list[str]) -> list[str]:
    return ["  " + p.upper().replace(" ", "   \t") + " " for p in paragraphs]


@pytest.fixture(scope="module")
def planted():
    """300 originals plus 120 planted copies of 120 distinct originals, 30 of each edit kind."""
    rng = random.Random(7)
    docs = _docs()
    rows = [_row(f"doc/{i:04d}", p) for i, p in enumerate(docs)]
    group = {r["id"]: r["id"] for r in rows}
    sources = rng.sample(range(len(docs)), 120)
    kinds = ["exact", "word50", "reorder", "spacecase"]
    for k, i in enumerate(sources):
        kind, p = kinds[k % 4], docs[i]
        if kind == "word50":
            p = _one_in_fifty(p, rng)
        elif kind == "reorder":
            p = p[1:] + p[:1]
        elif kind == "spacecase":
            p = _whitespace_case(p)
        rid = f"copy/{kind}/{k:03d}"
        rows.append(_row(rid, p))
        group[rid] = f"doc/{i:04d}"
    # a chain: each copy edits 1 word in 40 of the previous one, so neighbours are near-duplicates
    # (Jaccard ~0.88) but the ends are not (~0.5); ids out of chain order, so components need rounds
    words = "\n\n".join(docs[sources[0]] + docs[sources[1]]).split(" ")
    for step, rid in enumerate(["chain/e", "chain/b", "chain/f", "chain/a", "chain/d", "chain/c", "chain/g"]):
        for k in range(step * 7 % 40, len(words), 40):
            words[k] = f"w{step}{k}"
        rows.append(_row(rid, " ".join(words).split("\n\n")))
        group[rid] = "chain/e"  # the start of the chain stands for the group
    return rows, group


def _run(ray_local, rows, cfg=None, blocks=4, shuffle_seed=None, cpus=None) -> dict[str, tuple[str, str]]:
    rows = list(rows)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    table = rows_to_table(rows)
    if "score_llm" in rows[0]:
        table = table.append_column("score_llm", pa.array([r["score_llm"] for r in rows], pa.float64()))
    ds = ray_local.data.from_arrow(table).repartition(blocks)
    if cpus:  # this dataset (and all derived from it) runs at most `cpus` tasks at a time
        ds.context.execution_options.resource_limits = ExecutionResources(cpu=cpus)
    before = ds.context.shuffle_strategy
    out = dedup_dataset(ds, cfg or DedupConfig()).take_all()
    assert ds.context.shuffle_strategy == before  # the stage never changes the caller's settings
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)  # same rows, none lost
    return {r["id"]: (r["dedup_rule"], r["dup_of"]) for r in out}


@pytest.fixture(scope="module")
def result(ray_local, planted):
    return _run(ray_local, planted[0])


def test_planted_duplicates_recall_and_precision(result, planted):
    _, group = planted
    final = {i: (d or i) for i, (_, d) in result.items()}
    copies = [i for i in group if i.startswith(("copy/", "chain/"))]
    found = [c for c in copies if final[c] == final[group[c]]]
    recall = len(found) / len(copies)
    removed = [i for i, (rule, _) in result.items() if rule]
    precision = sum(group[i] == group[result[i][1]] for i in removed) / max(1, len(removed))
    assert recall >= 0.95, f"recall {recall:.3f}, missed {sorted(set(copies) - set(found))}"
    assert precision >= 0.98, f"precision {precision:.3f}"
    # exact copies and whitespace/case copies are exact duplicates after normalisation
    # copies sort before their originals ("copy/" < "doc/"), so the original is the one removed
    assert {d for i, (_, d) in result.items() if i.startswith("chain/")} == {"", "chain/a"}
    rules = {c: result[group[c]][0] for c in found if c.startswith("copy/")}
    assert all(rules[c] == "exact" for c in found if "/exact/" in c or "/spacecase/" in c)
    assert {rules[c] for c in found if "/word50/" in c or "/reorder/" in c} == {"minhash"}


def test_every_cluster_keeps_exactly_one_survivor(result, planted):
    _, group = planted
    for rid, (rule, dup_of) in result.items():
        assert (rule == "") == (dup_of == "")
        if rule:
            assert result[dup_of] == ("", ""), f"{rid} points at {dup_of}, which was removed"
    clusters: dict[str, list[str]] = {}
    for rid, (_, dup_of) in result.items():
        clusters.setdefault(dup_of or rid, []).append(rid)
    for survivor, members in clusters.items():
        assert [m for m in members if result[m][0] == ""] == [survivor]
    kept_per_group: dict[str, int] = {}
    for rid, (rule, _) in result.items():
        kept_per_group[group[rid]] = kept_per_group.get(group[rid], 0) + (rule == "")
    assert min(kept_per_group.values()) >= 1  # no planted group lost all its rows
    # keep=lowest_id: every removed row points at an id that sorts before it
    assert all(dup_of < rid for rid, (rule, dup_of) in result.items() if rule)


def test_same_result_with_one_or_two_workers_and_shuffled_order(ray_local, planted, result):
    rows, _ = planted
    assert _run(ray_local, rows, blocks=1, cpus=1) == result  # one worker
    assert _run(ray_local, rows, blocks=7, shuffle_seed=3, cpus=2) == result  # two workers, other order


def test_distributed_and_local_components_agree(ray_local, planted, result):
    rows, _ = planted
    assert _run(ray_local, rows, DedupConfig(local_components_max_edges=0)) == result  # star rounds only


def test_highest_score_survives(ray_local, planted):
    rows, group = planted
    rng = random.Random(1)
    scored = [{**r, "score_llm": float(rng.randrange(10))} for r in rows]
    score = {r["id"]: r["score_llm"] for r in scored}
    res = _run(ray_local, scored, DedupConfig(keep="highest_score", score_column="score_llm"))
    removed = [(rid, dup_of) for rid, (rule, dup_of) in res.items() if rule]
    assert len(removed) >= 114  # the same clusters as with keep=lowest_id (see the recall test)
    for rid, dup_of in removed:
        assert res[dup_of] == ("", "")
        assert score[dup_of] > score[rid] or (score[dup_of] == score[rid] and dup_of < rid)
    assert any(dup_of > rid for rid, dup_of in removed)  # some survivors are not the lowest id


def _reencode(data: bytes) -> bytes:
    """The image flattened on white, scaled to 80% and saved as JPEG quality 70 (a typical re-upload)."""
    im = Image.open(io.BytesIO(data)).convert("RGBA")
    flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
    flat.alpha_composite(im)
    buf = io.BytesIO()
    flat.convert("RGB").resize((im.width * 4 // 5, im.height * 4 // 5)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def test_image_near_duplicates(ray_local, sample_images):
    """Re-encoded images under a different caption are image duplicates; distinct images are not."""
    if len(sample_images) < 12:
        pytest.skip("bundled sample images missing")
    docs = _docs()
    images = [Path(p).read_bytes() for p in sample_images[:12]]
    rows = [_row(f"img/{i:02d}", docs[i][:1], images=[b]) for i, b in enumerate(images)]
    rows += [_row(f"img/re{i:02d}", docs[50 + i][:1], images=[_reencode(images[i])]) for i in range(4)]
    rows.append(_row("img/two", docs[80][:1], images=images[:2]))
    rows.append(_row("img/two-re", docs[81][:1], images=[_reencode(images[0]), _reencode(images[1])]))
    rows.append(_row("img/two-swapped", docs[82][:1], images=[images[1], images[0]]))
    res = _run(ray_local, rows, DedupConfig(image=True))
    removed = {rid: v for rid, v in res.items() if v[0]}
    assert removed == {
        **{f"img/re{i:02d}": ("image", f"img/{i:02d}") for i in range(4)},
        "img/two-re": ("image", "img/two"),
    }
    assert not any(v[0] for v in _run(ray_local, rows, DedupConfig(image=False)).values())


def test_decisions_only_equal_the_full_stage(ray_local, planted, result):
    rows, _ = planted
    ds = ray_local.data.from_arrow(rows_to_table(rows)).repartition(3)
    got = {r["id"]: (r["dedup_rule"], r["dup_of"]) for r in dedup_decisions(ds, DedupConfig()).take_all()}
    assert got == {i: v for i, v in result.items() if v[0]}


def test_empty_input(ray_local):
    ds = ray_local.data.from_arrow(rows_to_table([]))
    assert dedup_decisions(ds).count() == 0


def _key_files(rows: list[dict], folder: Path, shards: int, copies: dict[str, str]) -> list[str]:
    """Key files as the curate runner writes them: one per shard, `copies` (copy id -> original id)
    are repeat_time rows that carry their original's `orig`."""
    files = []
    for k in range(shards):
        part = [r for i, r in enumerate(rows) if i % shards == k]
        t = row_keys(rows_to_table(part), DedupConfig())
        ids = t.column("id").to_pylist()
        t = (t.append_column("orig", pa.array([copies.get(i, i) for i in ids], pa.string()))
             .append_column("_shard", pa.array([f"s{k}"] * len(part), pa.string()))
             .append_column("_row", pa.array(range(len(part)), pa.int64())))
        files.append(str(folder / f"s{k}.keys.parquet"))
        pq.write_table(t, files[-1])
    return files


def _shard_decisions(folder: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for f in sorted(folder.glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            out[r["id"]] = (r["dedup_rule"], r["dup_of"])
    return out


def test_decisions_by_shard_follow_originals_and_not_the_partitioning(ray_local, planted, result, tmp_path):
    """Decisions per shard from key files: the same as the Dataset stage, copies take their original's,
    the same with 1 or many partitions per step (cross-task verification), and only file names and
    counts go through the object store (far less than one signature per key row)."""
    rows, _ = planted
    removed = {i: v for i, v in result.items() if v[0]}
    kept_one, gone_one = next(i for i, v in result.items() if not v[0]), next(iter(removed))
    copies = {f"{kept_one}#r1": kept_one, f"{gone_one}#r1": gone_one}
    extra = [{**next(r for r in rows if r["id"] == o), "id": c, "conversations": [{"from": "gpt", "value": "x"}]}
             for c, o in copies.items()]  # a copy's own text never matters: it follows its original
    files = _key_files(rows + extra, tmp_path, 5, copies)
    store = StoreBytes()
    stats = decisions_by_shard(files, DedupConfig(), str(tmp_path / "one"), store)
    got = _shard_decisions(tmp_path / "one")
    assert got == {**removed, f"{gone_one}#r1": removed[gone_one]}
    assert stats["removed"] == len(removed) and sum(stats["by_rule"].values()) == len(removed)
    assert 0 < store.total < 512 * len(rows), store.total
    many = decisions_by_shard(files, DedupConfig(rows_per_partition=40), str(tmp_path / "many"))
    assert _shard_decisions(tmp_path / "many") == got and many["by_rule"] == stats["by_rule"]
    assert not (tmp_path / "one" / "_work").exists()  # the partitions are removed
