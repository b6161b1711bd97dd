"""The canonical sample schema (ARCHITECTURE.md, "Data contracts") and its validator; turn roles and the
`<image>` rule are operators/conversation.py's."""

from __future__ import annotations

import json

import pyarrow as pa

TURN = pa.struct([("from", pa.string()), ("value", pa.string())])

CANONICAL = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("category", pa.string()),
        ("conversations", pa.list_(TURN)),
        ("images", pa.list_(pa.binary())),
        ("meta", pa.string()),
    ]
)


def empty_table(schema: pa.Schema = CANONICAL) -> pa.Table:
    return schema.empty_table()


def rows_to_table(rows: list[dict], schema: pa.Schema = CANONICAL) -> pa.Table:
    """Build a table with exactly `schema`'s columns (extra keys in rows are ignored)."""
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def validate_table(table: pa.Table) -> list[str]:
    """Return the ways `table` breaks the canonical contract (empty list when it is valid).

    Extra columns (scores, reasons) are allowed; the content columns must exist with their types,
    ids must be non-null and unique, and `meta` must be a JSON object."""
    errors = []
    for field in CANONICAL:
        if field.name not in table.column_names:
            errors.append(f"missing column {field.name!r}")
            continue
        got = table.schema.field(field.name).type
        if not got.equals(field.type) and not _compatible(got, field.type):
            errors.append(f"column {field.name!r} is {got}, expected {field.type}")
    if errors:
        return errors
    ids = table.column("id")
    if ids.null_count:
        errors.append(f"{ids.null_count} null id(s)")
    if len(set(ids.to_pylist())) != table.num_rows:
        errors.append("ids are not unique")
    for i, m in enumerate(table.column("meta").to_pylist()):
        try:
            if not isinstance(json.loads(m or "{}"), dict):
                raise ValueError
        except ValueError:
            errors.append(f"row {i}: meta is not a JSON object")
            break
    return errors


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    """large_string/large_binary/large_list read back from other writers count as the same type."""
    norm = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}
    if norm.get(got, got).equals(want):
        return True
    if pa.types.is_list(got) or pa.types.is_large_list(got):
        return pa.types.is_list(want) and _compatible(got.value_type, want.value_type)
    if pa.types.is_struct(got) and pa.types.is_struct(want):
        return [f.name for f in got] == [f.name for f in want] and all(
            _compatible(a.type, b.type) for a, b in zip(got, want)
        )
    return False


def conform(table: pa.Table) -> pa.Table:
    """Cast content columns to the canonical types, keeping extra columns after them."""
    cols = [table.column(n).cast(CANONICAL.field(n).type) for n in CANONICAL.names]
    extra = [n for n in table.column_names if n not in CANONICAL.names]
    return pa.Table.from_arrays(
        cols + [table.column(n) for n in extra],
        schema=pa.schema(list(CANONICAL) + [table.schema.field(n) for n in extra]),
    )
