"""Manual review of a curate run's `review/` rows (InternVL 2.5 §4.3: heuristic and repetition hits are
checked by a person before removal).

`ReviewSet` indexes RUN/review/ (ids, sources, reasons, score columns: never images or text) and the
dedup neighbours in RUN/rejected/ (`dup_of`), and reads one full row on demand. Decisions are appended, one
JSON line each (`{"id", "decision": keep|reject, "note", "reviewer", "ts"}`), to RUN/review/decisions.jsonl and
fsynced as they are made, so a crash loses nothing; several reviewers' files merge by taking the latest
decision per id (`load_decisions`). `apply_decisions` writes a new run folder: reviewed rows move to kept/ or
rejected/ (`review:manual`, the note in `review_note`), unreviewed rows stay in review/, RUN's other shards are
linked unchanged; it is a pure function of (RUN, decisions), so a rerun gives the same files.
The web app that drives this is `pipeline.review_server`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import write_parquet_atomic
from pipeline.report import SPLITS, AccountingError, write_summary

DECISIONS = ("keep", "reject")
MANUAL_REASON = "review:manual"


def _parquet_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.endswith(".parquet") and not f.startswith((".", "_")))


@dataclass
class ReviewSet:
    """The review rows of one curate run, indexed by position (0..n-1) in file order. The index holds ids,
    sources, reasons and scores only; content (text, images) is read one row at a time."""

    run: str
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)
    scores: list[dict[str, float | None]] = field(default_factory=list)
    where: list[tuple[str, int]] = field(default_factory=list)  # (file, row in file)
    dup_neighbours: dict[str, list[str]] = field(default_factory=dict)
    _open: tuple[str, pa.Table | None] = ("", None)  # the shard read last

    @classmethod
    def open(cls, run: str) -> ReviewSet:
        rs = cls(run=run)
        for path in _parquet_files(os.path.join(run, "review")):
            names = pq.read_schema(path).names
            score_cols = [c for c in names if c.startswith("score_")]
            t = pq.read_table(path, columns=["id", "source", "review_reason", *score_cols])
            cols = {c: t.column(c).to_pylist() for c in score_cols}
            for i, (rid, src, why) in enumerate(zip(t.column("id").to_pylist(), t.column("source").to_pylist(),
                                                    t.column("review_reason").to_pylist())):
                rs.ids.append(rid)
                rs.sources.append(src)
                rs.reasons.append([r for r in (why or "").split(";") if r])
                rs.scores.append({c: _finite(v[i]) for c, v in cols.items()})
                rs.where.append((path, i))
        for path in _parquet_files(os.path.join(run, "rejected")):
            if "dup_of" not in pq.read_schema(path).names:
                continue
            t = pq.read_table(path, columns=["id", "dup_of"])
            for rid, survivor in zip(t.column("id").to_pylist(), t.column("dup_of").to_pylist()):
                if survivor:
                    rs.dup_neighbours.setdefault(survivor, []).append(rid)
        return rs

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, idx: int) -> dict:
        """One full review row (conversations, images, meta, every reason and score)."""
        path, i = self.where[idx]
        if self._open[0] != path:  # a reviewer pages in file order: one shard read per shard, not per row
            self._open = (path, pq.read_table(path))
        return self._open[1].slice(i, 1).to_pylist()[0]

    def matches(self, idx: int, reason: str = "", source: str = "", score: str = "",
                lo: float | None = None, hi: float | None = None) -> bool:
        if reason and not any(r == reason or r.startswith(reason + ":") for r in self.reasons[idx]):
            return False
        if source and self.sources[idx] != source:
            return False
        if score:
            v = self.scores[idx].get(score)
            if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
                return False
        return True


def _finite(v):
    return v if isinstance(v, int | float) and v == v and abs(v) != float("inf") else None


# ---- decisions ----------------------------------------------------------------------------------

def decisions_path(run: str) -> str:
    return os.path.join(run, "review", "decisions.jsonl")


def append_decision(path: str, rid: str, decision: str, note: str = "", reviewer: str = "") -> dict:
    """Append one decision and fsync it: the file is the only state, so a crash loses nothing."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    rec = {"id": rid, "decision": decision, "note": note, "reviewer": reviewer, "ts": time.time()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return rec


def load_decisions(paths: list[str]) -> dict[str, dict]:
    """id -> latest decision over all files (by timestamp; within a file, later lines win ties).
    A torn last line (a crash mid-write) is skipped."""
    latest: dict[str, tuple[float, int, dict]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("decision") not in DECISIONS or not rec.get("id"):
                    continue
                key = (float(rec.get("ts", 0)), n)
                if rec["id"] not in latest or key >= latest[rec["id"]][:2]:
                    latest[rec["id"]] = (*key, rec)
    return {rid: v[2] for rid, v in latest.items()}


# ---- applying decisions -------------------------------------------------------------------------

def _count_rows(folder: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in _parquet_files(folder))


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def apply_decisions(run: str, decision_files: list[str], out: str) -> dict:
    """Write OUT as RUN with the reviewed rows moved; returns OUT/report/summary.json's content."""
    if os.path.abspath(run) == os.path.abspath(out):
        raise ValueError("--out must differ from --in: the run stays as it was, the result is a new folder")
    decisions = load_decisions(decision_files)
    before = {s: _count_rows(os.path.join(run, s)) for s in SPLITS}
    planned: dict[str, set[str]] = {s: set() for s in SPLITS}
    for split in ("kept", "rejected"):
        for path in _parquet_files(os.path.join(run, split)):
            dst = os.path.join(out, split, os.path.basename(path))
            _link(path, dst)
            planned[split].add(dst)
    moved = {"keep": 0, "reject": 0}
    unknown = set(decisions)
    for path in _parquet_files(os.path.join(run, "review")):
        t = pq.read_table(path)
        ids = t.column("id").to_pylist()
        unknown -= set(ids)
        verdict = [decisions.get(i, {}).get("decision", "") for i in ids]
        stem = os.path.basename(path)[: -len(".parquet")]
        keep = t.filter(pa.array([v == "keep" for v in verdict]))
        rej = t.filter(pa.array([v == "reject" for v in verdict]))
        rest = t.filter(pa.array([v == "" for v in verdict]))
        moved["keep"] += keep.num_rows
        moved["reject"] += rej.num_rows
        if keep.num_rows:  # the kept schema: content + scores, no routing columns
            dst = os.path.join(out, "kept", f"{stem}-reviewed.parquet")
            write_parquet_atomic(keep.drop_columns([c for c in ("review_reason",) if c in keep.column_names]), dst)
            planned["kept"].add(dst)
        if rej.num_rows:
            notes = [decisions[i]["note"] for i in rej.column("id").to_pylist()]
            rej = (rej.drop_columns(["review_reason"]) if "review_reason" in rej.column_names else rej)
            rej = rej.append_column("reject_reason", pa.array([MANUAL_REASON] * rej.num_rows, pa.string()))
            rej = rej.append_column("review_note", pa.array(notes, pa.string()))
            dst = os.path.join(out, "rejected", f"{stem}-reviewed.parquet")
            write_parquet_atomic(rej, dst)
            planned["rejected"].add(dst)
        if rest.num_rows:
            dst = os.path.join(out, "review", os.path.basename(path))
            write_parquet_atomic(rest, dst)
            planned["review"].add(dst)
    for split in SPLITS:  # files of an earlier apply with other decisions
        for path in _parquet_files(os.path.join(out, split)):
            if path not in planned[split]:
                os.remove(path)
    after = {s: _count_rows(os.path.join(out, s)) for s in SPLITS}
    if sum(after.values()) != sum(before.values()):
        raise AccountingError(f"review apply: {sum(before.values())} rows in {run}, {sum(after.values())} in {out}")
    summary = {"input": sum(before.values()), **after, "reviewed_kept": moved["keep"],
               "reviewed_rejected": moved["reject"], "decisions": len(decisions),
               "decisions_for_unknown_ids": len(unknown), "from": os.path.abspath(run)}
    write_summary(out, summary)
    return summary
