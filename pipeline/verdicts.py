"""Verdict folding: one operator's decisions, rules and score columns folded into a unit's routing state.

A unit's routing state is four columns next to its content: `_row` (position in the input shard),
`_decision` (KEEP / REVIEW / REJECT, the strongest so far), `reject_reason` (a typed `Reason`, null
while not rejected) and `review_reason` (every `Reason` that sent the row to review). Reasons stay
(operator, rule) values until routing writes them out as the `<operator>:<rule>` strings of the
output contract (`Reason.__str__`). Operator seconds are summed per stage into a `StageStat` dict
that ends in the unit's marker, never in a per-row column.

This module imports no Ray, matplotlib or dedup code: it is what every curate worker loads.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa

from operators.base import KEEP, REJECT, REVIEW, Operator
from pipeline.curate_config import Stage
from pipeline.io import read_canonical
from pipeline.jobs import StageStat
from pipeline.schema import CANONICAL

if TYPE_CHECKING:  # (annotations only: a worker without dedup never imports it)
    from pipeline.curate_config import DedupConfig
    from pipeline.dedup_stage import KeyMaker

REASON = pa.struct([("operator", pa.string()), ("rule", pa.string())])
ROUTING = pa.schema([("_row", pa.int64()), ("_decision", pa.int8()), ("reject_reason", REASON),
                     ("review_reason", pa.list_(REASON))])
CORRUPT_SHARD = ("input", "corrupt_shard")  # the reason of the one row that stands for an unreadable shard


class Reason(NamedTuple):
    """Why a row was rejected or sent to review: the stage (operator label) and its rule."""

    operator: str
    rule: str

    def __str__(self) -> str:  # the output contract: `reject_reason` / `review_reason` = "<operator>:<rule>"
        return f"{self.operator}:{self.rule}"

    @classmethod
    def parse(cls, text: str) -> Reason:
        """A contract string back to its parts: only where rows arrive from outside the runner (row_pass)."""
        operator, _, rule = text.partition(":")
        return cls(operator, rule)


def reasons_of(column: pa.ChunkedArray | pa.Array) -> list[Reason | None]:
    """A `reject_reason` column as Reason values (None where the row is not rejected)."""
    return [None if r is None else Reason(r["operator"], r["rule"]) for r in column.to_pylist()]


def review_reasons_of(column: pa.ChunkedArray | pa.Array) -> list[list[Reason]]:
    return [[Reason(r["operator"], r["rule"]) for r in rs or []] for rs in column.to_pylist()]


def with_routing(table: pa.Table, reject: Reason | None = None) -> pa.Table:
    """`table` with fresh routing columns: every row kept, or every row rejected for `reject`."""
    n = table.num_rows
    cols = [pa.array(range(n), pa.int64()), pa.array([REJECT if reject else KEEP] * n, pa.int8()),
            pa.array([reject._asdict() if reject else None] * n, REASON), pa.array([[]] * n, pa.list_(REASON))]
    for field, col in zip(ROUTING, cols):
        table = table.append_column(field, col)
    return table


def contract_reasons(table: pa.Table, reject: list[Reason | None], review: list[list[Reason]]) -> pa.Table:
    """`table` with its reason columns as the output contract's strings, in the same places: "<operator>:<rule>"
    ("" when none), several review reasons ";"-joined."""
    return (table.set_column(table.schema.get_field_index("reject_reason"), "reject_reason",
                             pa.array(["" if r is None else str(r) for r in reject], pa.string()))
            .set_column(table.schema.get_field_index("review_reason"), "review_reason",
                        pa.array([";".join(map(str, rs)) for rs in review], pa.string())))


def typed_reasons(table: pa.Table) -> pa.Table:
    """Rows that carry contract strings (a caller's own routing columns) with typed reason columns."""
    if pa.types.is_struct(table.schema.field("reject_reason").type):
        return table
    reject = [Reason.parse(r)._asdict() if r else None for r in table.column("reject_reason").to_pylist()]
    review = [[Reason.parse(x)._asdict() for x in r.split(";")] if r else [] for r in table.column("review_reason").to_pylist()]
    return (table.set_column(table.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reject, REASON))
            .set_column(table.schema.get_field_index("review_reason"), "review_reason",
                        pa.array(review, pa.list_(REASON))))


def _put(t: pa.Table, col: str, arr: pa.Array) -> pa.Table:
    i = t.schema.get_field_index(col)
    return t.set_column(i, col, arr) if i >= 0 else t.append_column(col, arr)


def _scatter_index(active: np.ndarray, n: int) -> pa.Array:
    """Take-index that puts value j at row active[j] and null elsewhere."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[active] = np.arange(len(active))
    return pa.array(pos, mask=pos < 0)


def apply_verdict(table: pa.Table, name: str, op: Operator, times: dict[str, StageStat] | None = None) -> pa.Table:
    """Run `op` on the rows not yet rejected and fold its verdict into the routing columns; the
    operator's seconds and the rows it saw are added to `times[name]`."""
    t0 = time.perf_counter()
    n = table.num_rows
    decision = table.column("_decision").to_numpy(zero_copy_only=False).copy()
    active = np.flatnonzero(decision != REJECT)
    out = table
    if len(active):
        v = op(table if len(active) == n else table.take(active))
        if len(v.decision) != len(active):
            raise RuntimeError(f"operator {name} returned {len(v.decision)} decisions for {len(active)} rows")
        d = np.asarray(v.decision)
        hits = np.flatnonzero(d != KEEP)
        if len(hits):
            reject = table.column("reject_reason").to_pylist()
            review = table.column("review_reason").to_pylist()
            for j in hits.tolist():
                i, why = int(active[j]), {"operator": name, "rule": v.rule[j]}
                if d[j] == REJECT:
                    decision[i], reject[i] = REJECT, why
                elif d[j] == REVIEW:
                    decision[i] = max(decision[i], REVIEW)
                    review[i] = [*review[i], why]
            out = _put(out, "reject_reason", pa.array(reject, REASON))
            out = _put(out, "review_reason", pa.array(review, pa.list_(REASON)))
            out = _put(out, "_decision", pa.array(decision, pa.int8()))
        scatter = None if len(active) == n else _scatter_index(active, n)
        for col, values in v.columns.items():
            arr = values if isinstance(values, pa.Array) else pa.array(values.tolist() if isinstance(values, np.ndarray) and values.dtype == object else values)
            if pa.types.is_integer(arr.type) and col.startswith("score_"):
                arr = arr.cast(pa.float64())
            out = _put(out, col, arr if scatter is None else arr.take(scatter))
    if times is not None:
        stat = times.setdefault(name, StageStat())
        stat.seconds += time.perf_counter() - t0
        stat.rows += len(active)
    return out


class StageOperators:
    """The operators of a worker (an actor of the curate runner's pools, or a Ray Data actor): each stage's
    operator built and its model loaded (setup()) once, on first use, then reused for every unit."""

    def __init__(self, stages: tuple[Stage, ...] = ()):
        self.built: dict[Stage, Operator] = {}
        self.keys: dict[str, KeyMaker] = {}  # dedup config (JSON) -> its key maker
        for stage in stages:
            self.get(stage)

    def key_maker(self, cfg: DedupConfig) -> KeyMaker:
        """The dedup key maker of `cfg`, built once per worker (its tokeniser tables take ~20 ms)."""
        from pipeline.dedup_stage import KeyMaker

        spec = cfg.model_dump_json()
        if spec not in self.keys:
            self.keys[spec] = KeyMaker(cfg)
        return self.keys[spec]

    def get(self, stage: Stage) -> Operator:
        if stage not in self.built:
            op = stage.build()
            op.setup()
            self.built[stage] = op
        return self.built[stage]


def apply_batched(table: pa.Table, stage: Stage, op: Operator, batch_size: int,
                  times: dict[str, StageStat] | None = None) -> pa.Table:
    """`apply_verdict` of `stage`'s operator over slices of at most batch_size rows (what it gets per call)."""
    if table.num_rows <= batch_size:
        return apply_verdict(table, stage.label, op, times)
    parts = [apply_verdict(table.slice(i, batch_size), stage.label, op, times)
             for i in range(0, table.num_rows, batch_size)]
    return pa.concat_tables(parts, promote_options="default")  # a slice may hold a null-typed column


def row_pass(table: pa.Table, name: str, op: Operator) -> pa.Table:
    """One operator over a row-carrying batch (a Ray Data map's): routing columns added when absent,
    the verdict folded in, reasons returned as the contract's strings. Ray Data maps return tables, so
    this path reports the operator's busy seconds as a `_sec_<name>` column (spread over the batch's
    rows); the curate runner's own path keeps them in the markers."""
    times: dict[str, StageStat] = {}
    table = typed_reasons(table) if "_decision" in table.column_names else with_routing(table)
    out = apply_verdict(table, name, op, times)
    out = contract_reasons(out, reasons_of(out.column("reject_reason")), review_reasons_of(out.column("review_reason")))
    secs = times[name].seconds / max(1, out.num_rows)
    return out.append_column(f"_sec_{name}", pa.array([secs] * out.num_rows, pa.float64()))


def run_stateless(table: pa.Table, stage: Stage) -> pa.Table:
    """`row_pass` for a Ray Data task map of an operator that holds no model (cheap to build per batch)."""
    return row_pass(table, stage.label, stage.build())


class OperatorActor:
    """A Ray Data actor (`map_batches(OperatorActor, fn_constructor_kwargs={"stage": ...})`): builds the
    operator and loads its model once (setup), then runs `row_pass` on each batch."""

    def __init__(self, stage: Stage):
        self.name = stage.label
        self.op = StageOperators((stage,)).get(stage)

    def __call__(self, table: pa.Table) -> pa.Table:
        return row_pass(table, self.name, self.op)


def corrupt_row(key: str, path: str, error: str) -> pa.Table:
    """The one row that stands for an unreadable shard (its file and error in `meta`)."""
    return pa.Table.from_pylist([{"id": f"{key}/@0", "source": "", "category": "", "conversations": [], "images": [],
                                  "meta": json.dumps({"file": path, "error": error[:2000]})}], schema=CANONICAL)


def load_unit(path: str, key: str) -> tuple[pa.Table, str | None]:
    """A unit's rows with fresh routing columns; a shard that cannot be read becomes one rejected row
    naming the file (and the error), so the job reports it and goes on with the rest."""
    try:
        return with_routing(read_canonical(path)), None
    except Exception as e:  # pyarrow/tarfile raise many kinds for truncated or foreign files
        error = str(e) or type(e).__name__
        return with_routing(corrupt_row(key, path, error), Reason(*CORRUPT_SHARD)), error
