"""The job layer: work units, typed markers, resume, accounting from the inputs, merged reports.

Every ivl job (ingest, curate, dedup, distill, pack, training planning) is a set of *work units*:
one input chunk each, with a key derived only from the input (its file name, made unique), so a
rerun names the same outputs. A unit writes its files under names built from its key (temp file +
rename, pipeline/io.py), then commits a `Marker` at `OUT/_done/<key>.json` (the commit point).

    units = plan_units(list_input_shards(in_dir))           # keys + input rows counted from the files
    todo = pending(out_dir, units)                          # resume: committed units are skipped
    ... each unit, on a worker: m = Marker(key, input=unit.rows); m.add_rows(...); commit(out_dir, m)
    summary = merge(read_markers(out_dir, units))           # the driver reads markers, never rows
    check_accounting(summary)                               # input (from the inputs) == kept+rejected+review

Accounting: `WorkUnit.rows` is counted from the input itself (Parquet footer row counts, tar sample
headers), independently of the readers and operators, and the marker's `input` is that count, never
kept + rejected; a reader or operator that loses a row makes `check_accounting` fail loudly.

Reports and plots are built from the merged markers only: a marker carries counts per split and
reason, per source, seconds and rows per stage, and fixed-bin histograms of score columns
(`Histogram`: 2-significant-digit bins, the same for every unit, so they add up), so the report never
re-reads an output shard.
"""

from __future__ import annotations

import math
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow.parquet as pq

from pipeline.io import open_input, read_marker, shard_key, write_marker

SPLITS = ("kept", "rejected", "review")


class AccountingError(RuntimeError):
    """Some input rows did not land in exactly one of kept/rejected/review."""


# ---- work units ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkUnit:
    """One input chunk: `key` names its outputs and marker; `rows` is counted from the input file."""

    key: str
    path: str
    rows: int | None  # None: the file cannot even be counted (corrupt footer or header)
    start: int = 0  # row range [start, stop) of the file (stop None: to the end)
    stop: int | None = None


def unit_keys(paths: list[str]) -> dict[str, str]:
    """Path -> key: the file's stem, or `<index>-<stem>` for all when two stems collide (same name in
    two folders); depends only on the sorted path list, so a rerun gets the same keys."""
    keys = {p: shard_key(p) for p in paths}
    if len(set(keys.values())) != len(paths):
        keys = {p: f"{i:05d}-{shard_key(p)}" for i, p in enumerate(paths)}
    return keys


def count_rows(path: str) -> int | None:
    """Rows of a canonical shard, counted without the readers: the Parquet footer's row count, or the
    number of WebDataset samples (runs of members sharing a key) from the tar headers. None if unreadable."""
    try:
        if path.endswith(".parquet"):
            return pq.ParquetFile(path).metadata.num_rows
        n, current = 0, None
        with open_input(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                if m.isdir():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                if key != current:
                    n, current = n + 1, key
        return n
    except Exception:  # pyarrow and tarfile raise many kinds for damaged files
        return None


def plan_units(paths: list[str]) -> list[WorkUnit]:
    """One unit per input shard, keyed by `unit_keys`, its rows counted by `count_rows`."""
    keys = unit_keys(paths)
    return [WorkUnit(keys[p], p, count_rows(p)) for p in paths]


# ---- markers ------------------------------------------------------------------------------------

@dataclass
class Histogram:
    """Counts of values in fixed bins: each value is rounded to 2 significant digits (0.873 -> 0.87,
    7.46 -> 7.5, 1234 -> 1200), so every unit bins alike and histograms merge by adding counts."""

    bins: dict[str, int] = field(default_factory=dict)  # bin value (as a string, JSON keys) -> count
    missing: int = 0  # None / NaN (rows an operator skipped)

    @staticmethod
    def bin_of(v: float) -> float:
        return 0.0 if v == 0 else float(f"{v:.2g}")

    def add(self, values: Iterable) -> Histogram:
        c = Counter()
        for v in values:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                self.missing += 1
            else:
                c[repr(self.bin_of(float(v)))] += 1
        for k, n in c.items():
            self.bins[k] = self.bins.get(k, 0) + n
        return self

    def add_array(self, values: np.ndarray) -> Histogram:
        """`add` of a float array (NaN = missing): each distinct value binned once."""
        nan = np.isnan(values)
        self.missing += int(nan.sum())
        for v, n in zip(*(x.tolist() for x in np.unique(values[~nan], return_counts=True))):
            k = repr(self.bin_of(v))
            self.bins[k] = self.bins.get(k, 0) + n
        return self

    def merge(self, other: Histogram) -> Histogram:
        for k, n in other.bins.items():
            self.bins[k] = self.bins.get(k, 0) + n
        self.missing += other.missing
        return self

    def to_json(self) -> dict:
        return {"bins": self.bins, "missing": self.missing}

    def values_and_counts(self) -> tuple[list[float], list[int]]:
        items = sorted((float(k), n) for k, n in self.bins.items())
        return [k for k, _ in items], [n for _, n in items]


@dataclass
class StageStat:
    """One stage of one unit: busy seconds and the rows it was given."""

    seconds: float = 0.0
    rows: int = 0


@dataclass
class Marker:
    """What a committed unit did. `input` comes from the unit (counted from the input), never from
    the splits; `check_accounting` compares the two."""

    key: str
    input: int
    kept: int = 0
    rejected: int = 0
    review: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # reject reason -> rows
    review_reasons: dict[str, int] = field(default_factory=dict)  # review reason -> rows (a row may have several)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {input, kept, rejected, review}
    stages: dict[str, StageStat] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)  # score column -> histogram
    operators: dict[str, dict[str, int]] = field(default_factory=dict)  # operator -> {split: reasons it gave}
    files: list[str] = field(default_factory=list)  # outputs, relative to OUT
    extra: dict = field(default_factory=dict)  # job-specific figures (JSON values)

    def add_rows(self, split: str, sources: Iterable[str], reasons: Iterable[str | list[str]] = ()) -> None:
        """Count rows routed to `split`, one source per row, and their reasons: per row one reason, or
        the list of them (a review row may have several)."""
        n = 0
        for src in sources:
            c = self.sources.setdefault(src, {"input": 0, **{s: 0 for s in SPLITS}})
            c["input"] += 1
            c[split] += 1
            n += 1
        setattr(self, split, getattr(self, split) + n)
        target = self.review_reasons if split == "review" else self.reasons
        for r in reasons:
            for part in [r] if isinstance(r, str) else r:
                if part:
                    target[part] = target.get(part, 0) + 1

    def add_operator(self, operator: str, split: str, n: int = 1) -> None:
        """Count a reason `operator` gave for a row routed to `split` (the report's per-operator table)."""
        c = self.operators.setdefault(operator, {})
        c[split] = c.get(split, 0) + n

    def add_stage(self, name: str, seconds: float, rows: int) -> None:
        s = self.stages.setdefault(name, StageStat())
        s.seconds += seconds
        s.rows += rows

    def add_scores(self, column: str, values: Iterable) -> None:
        self.histograms.setdefault(column, Histogram()).add(values)

    def to_json(self) -> dict:
        """As asdict(self), without its deep copy of every bin (a tenth of a routing task's time)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stages"] = {k: vars(s) for k, s in self.stages.items()}
        d["histograms"] = {k: h.to_json() for k, h in self.histograms.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> Marker:
        d = dict(d)
        d["stages"] = {k: StageStat(**v) for k, v in d.get("stages", {}).items()}
        d["histograms"] = {k: Histogram(**v) for k, v in d.get("histograms", {}).items()}
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


def commit(out_dir: str, marker: Marker) -> None:
    """The unit's commit point: written last, after all its data files."""
    write_marker(out_dir, marker.key, marker.to_json())


def read_unit_marker(out_dir: str, key: str) -> Marker | None:
    d = read_marker(out_dir, key)
    return Marker.from_json(d) if d is not None and "input" in d else None


def pending(out_dir: str, units: list[WorkUnit], done=None) -> list[WorkUnit]:
    """Resume: the units without a committed marker (`done(key)` overrides the test)."""
    done = done or (lambda k: read_marker(out_dir, k) is not None)
    return [u for u in units if not done(u.key)]


def read_markers(out_dir: str, units: list[WorkUnit]) -> list[Marker]:
    out = []
    for u in units:
        m = read_unit_marker(out_dir, u.key)
        if m is None:
            raise AccountingError(f"unit {u.key} ({u.path}) has no committed marker")
        out.append(m)
    return out


# ---- merging and accounting ---------------------------------------------------------------------

def merge(markers: list[Marker]) -> dict:
    """Sum markers into a summary: input, splits, reasons, review_reasons, sources, stage seconds and
    rows, histograms (as {column: {bins, missing}}), units. JSON-ready."""
    total = Marker(key="", input=0)
    for m in markers:
        total.input += m.input
        for s in SPLITS:
            setattr(total, s, getattr(total, s) + getattr(m, s))
        for name, target in (("reasons", total.reasons), ("review_reasons", total.review_reasons)):
            for k, n in getattr(m, name).items():
                target[k] = target.get(k, 0) + n
        for src, c in m.sources.items():
            t = total.sources.setdefault(src, {})
            for k, n in c.items():
                t[k] = t.get(k, 0) + n
        for k, st in m.stages.items():
            total.add_stage(k, st.seconds, st.rows)
        for k, h in m.histograms.items():
            total.histograms.setdefault(k, Histogram()).merge(h)
        for op, c in m.operators.items():
            for split, n in c.items():
                total.add_operator(op, split, n)
    return {
        "input": total.input, **{s: getattr(total, s) for s in SPLITS},
        "reasons": dict(sorted(total.reasons.items())), "review_reasons": dict(sorted(total.review_reasons.items())),
        "sources": {k: v for k, v in sorted(total.sources.items())},
        "stage_seconds": {k: round(v.seconds, 3) for k, v in total.stages.items()},
        "stage_rows": {k: v.rows for k, v in total.stages.items()},
        "histograms": {k: asdict(v) for k, v in sorted(total.histograms.items())},
        **({"operators": dict(sorted(total.operators.items()))} if total.operators else {}),  # jobs whose rows get reasons
        "units": len(markers),
    }


def check_accounting(summary: dict, markers: list[Marker] | None = None, splits=SPLITS) -> None:
    """input (counted from the inputs) must equal the rows routed, per unit, per source and in total."""
    for m in markers or []:
        out = sum(getattr(m, s) for s in splits)
        if m.input != out:
            raise AccountingError(f"unit {m.key}: {m.input} rows in the input but {out} routed ({', '.join(splits)})")
    out = sum(summary[s] for s in splits)
    if summary["input"] != out:
        raise AccountingError(f"{summary['input']} rows in but {out} accounted for ({', '.join(splits)})")
    for src, c in summary.get("sources", {}).items():
        if c.get("input", 0) != sum(c.get(s, 0) for s in splits):
            raise AccountingError(f"source {src}: {c}")



