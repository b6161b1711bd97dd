"""The job layer (pipeline/jobs.py): unit keys, input counts from the files, markers, resume, accounting."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io import table_to_tar, write_parquet_atomic
from pipeline.jobs import (
    AccountingError,
    Histogram,
    Marker,
    check_accounting,
    commit,
    count_rows,
    merge,
    pending,
    plan_units,
    read_markers,
    unit_keys,
)
from pipeline.schema import rows_to_table


def _rows(n, source="s"):
    return rows_to_table([{"id": f"{source}/{i}", "source": source, "category": "", "meta": "{}",
                           "images": [b"\x89PNG" + bytes([i % 256])] * (i % 3),
                           "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(n)])


def test_input_rows_are_counted_from_the_files_not_the_readers(tmp_path):
    write_parquet_atomic(_rows(17), str(tmp_path / "a.parquet"))
    (tmp_path / "b.tar").write_bytes(table_to_tar(_rows(9)))  # 2 of 3 rows carry images: several members each
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not parquet")
    units = plan_units([str(tmp_path / n) for n in ("a.parquet", "b.tar", "c.parquet")])
    assert [(u.key, u.rows) for u in units] == [("a", 17), ("b", 9), ("c", None)]
    assert count_rows(str(tmp_path / "missing.parquet")) is None


def test_unit_keys_stay_unique_and_stable():
    assert unit_keys(["x/a.parquet", "x/b.tar"]) == {"x/a.parquet": "a", "x/b.tar": "b"}
    assert unit_keys(["x/a.parquet", "y/a.parquet"]) == {"x/a.parquet": "00000-a", "y/a.parquet": "00001-a"}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6), st.integers(-1000, 1000)), max_size=30), max_size=5))
def test_histograms_merge_to_the_histogram_of_all_values(chunks):
    parts = [Histogram().add(c) for c in chunks]
    merged = Histogram()
    for p in parts:
        merged.merge(p)
    whole = Histogram().add([v for c in chunks for v in c])
    assert merged.bins == whole.bins and merged.missing == whole.missing
    assert sum(whole.bins.values()) + whole.missing == sum(len(c) for c in chunks)
    # a score column's histogram (routing.score_histograms): from its float array, nulls as NaN
    col = pa.chunked_array([pa.array(c, pa.float64()) for c in chunks], pa.float64())
    assert Histogram().add_array(col.to_numpy().astype(np.float64)) == whole


def test_markers_round_trip_merge_and_catch_a_lost_row(tmp_path):
    out = str(tmp_path)
    m = Marker(key="a", input=4)
    m.add_rows("kept", ["s1", "s1"])
    m.add_rows("rejected", ["s2"], ["op:x"])
    m.add_rows("review", ["s1"], [["op:y", "op2:z"]])  # a review row may carry several reasons
    m.add_stage("op", 0.5, 4)
    m.add_scores("score_x", [0.11, 0.114, None])
    m.add_operator("op", "rejected")
    assert m.to_json() == asdict(m)  # (written without asdict's deep copy)
    commit(out, m)
    units = plan_units([])
    assert pending(out, units) == []
    from pipeline.jobs import WorkUnit

    units = [WorkUnit("a", "a.parquet", 4), WorkUnit("b", "b.parquet", 2)]
    assert [u.key for u in pending(out, units)] == ["b"]
    with pytest.raises(AccountingError, match="unit b"):
        read_markers(out, units)
    lost = Marker(key="b", input=2)
    lost.add_rows("kept", ["s2"])  # a reader that dropped one of its two rows
    commit(out, lost)
    markers = read_markers(out, units)
    assert markers[0] == m
    s = merge(markers)
    assert (s["input"], s["kept"], s["rejected"], s["review"]) == (6, 3, 1, 1)
    assert s["review_reasons"] == {"op:y": 1, "op2:z": 1} and s["reasons"] == {"op:x": 1}
    assert s["histograms"]["score_x"] == {"bins": {"0.11": 2}, "missing": 1}
    assert s["stage_seconds"] == {"op": 0.5} and s["stage_rows"] == {"op": 4}
    with pytest.raises(AccountingError, match="unit b: 2 rows in the input but 1 routed"):
        check_accounting(s, markers)
    with pytest.raises(AccountingError, match="6 rows in but 5"):
        check_accounting(s)


def test_empty_input_counts_zero(tmp_path):
    write_parquet_atomic(pa.table({"id": pa.array([], pa.string())}), str(tmp_path / "e.parquet"))
    assert count_rows(str(tmp_path / "e.parquet")) == 0
