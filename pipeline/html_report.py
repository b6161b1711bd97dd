"""`report/index.html`: one self-contained page per job, and one for a whole chain.

A job's page is built from what the job already wrote (report/summary.json and its PNGs) plus a few example
rows per rejection and review reason, read from at most `MAX_FILES` shards with only the columns shown, so
its cost does not grow with the dataset. Plots and thumbnails are embedded as data URIs: the page opens
offline, attached to a mail or copied off a cluster. Every value is escaped (`html.escape`); a sample's
`<script>` shows as text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

import pyarrow.parquet as pq

from pipeline.io import list_files, read_bytes

EXAMPLES_PER_REASON = 3
MAX_FILES = 20
THUMB = 160
STYLE = """body{font-family:sans-serif;margin:16px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}
th{background:#eef}figure{display:inline-block;margin:6px}figure img{max-width:560px}
.ex{border:1px solid #ddd;border-radius:6px;padding:6px;margin:6px 0}.ex img{max-height:120px;margin:2px}
.turn{white-space:pre-wrap;font-size:13px;margin:2px 0}.role{font-weight:bold;color:#555}"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


def _table(d: dict, title: str = "") -> str:
    """A dict as a table: scalars as key/value rows; a dict of dicts as a matrix."""
    if not d:
        return ""
    head = f"<h3>{_e(title)}</h3>" if title else ""
    if all(isinstance(v, dict) for v in d.values()):
        cols = sorted({k for v in d.values() for k in v})
        rows = "".join(f"<tr><th>{_e(k)}</th>" + "".join(f"<td>{_e(_fmt(v.get(c)))}</td>" for c in cols) + "</tr>"
                       for k, v in d.items())
        return f"{head}<table><tr><th></th>{''.join(f'<th>{_e(c)}</th>' for c in cols)}</tr>{rows}</table>"
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v) if not isinstance(v, list | dict) else json.dumps(v))}</td></tr>"
                   for k, v in d.items())
    return f"{head}<table>{rows}</table>"


def _png(path: str) -> str:
    data = base64.b64encode(read_bytes(path)).decode()  # a report folder on any storage
    name = os.path.basename(path)
    return f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}"><figcaption>{_e(name)}</figcaption></figure>'


def _thumb(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception:  # an undecodable image is itself a reason to be here
        return "<span>[image does not decode]</span>"
    return f'<img alt="image" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def examples(folder: str, reason_col: str, per_reason: int = EXAMPLES_PER_REASON) -> dict[str, list[dict]]:
    """A few rows per reason from the first MAX_FILES shards of `folder` (only the columns shown)."""
    out: dict[str, list[dict]] = {}
    for path in list_files(folder, ".parquet", recursive=False)[:MAX_FILES]:
        pf = pq.ParquetFile(path)
        cols = [c for c in ("id", reason_col, "conversations", "images", "review_note") if c in pf.schema_arrow.names]
        if reason_col not in cols:
            continue
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            for row in batch.to_pylist():
                for reason in (row.get(reason_col) or "").split(";"):
                    if reason and len(out.setdefault(reason, [])) < per_reason:
                        out[reason].append(row)
    return out


def _example_html(row: dict, reason_col: str) -> str:
    turns = "".join(f'<div class="turn"><span class="role">{_e(t.get("from"))}:</span> {_e(t.get("value"))[:1500]}</div>'
                    for t in (row.get("conversations") or [])[:4])
    imgs = "".join(_thumb(b) for b in (row.get("images") or [])[:4])
    note = f"<div>note: {_e(row['review_note'])}</div>" if row.get("review_note") else ""
    return f'<div class="ex"><b>{_e(row.get("id"))}</b> <i>{_e(row.get(reason_col))}</i>{note}<div>{imgs}</div>{turns}</div>'


def job_body(out_dir: str) -> tuple[str, dict]:
    """The HTML of one job's report (summary tables, plots, examples) and its summary."""
    rdir = os.path.join(out_dir, "report")
    try:
        summary = json.loads(read_bytes(os.path.join(rdir, "summary.json")))
    except (OSError, json.JSONDecodeError):
        summary = {}
    scalars = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    parts = [_table(scalars, "summary")]
    parts += [_table(v, k) for k, v in summary.items() if isinstance(v, dict) and v]
    pngs = sorted({f for d in (rdir, out_dir) for f in list_files(d, ".png", recursive=False, hidden=True)})
    if pngs:
        parts.append("<h2>plots</h2>" + "".join(_png(p) for p in pngs))
    for folder, col, title in (("rejected", "reject_reason", "rejected"), ("review", "review_reason", "sent to review")):
        ex = examples(os.path.join(out_dir, folder), col)
        if ex:
            parts.append(f"<h2>examples {title}, per reason</h2>")
            for reason in sorted(ex):
                parts.append(f"<h3>{_e(reason)}</h3>" + "".join(_example_html(r, col) for r in ex[reason]))
    return "\n".join(parts), summary


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>\n{body}\n</body></html>\n")


def _write(path: str, text: str) -> str:
    from pipeline.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def write_job_report(out_dir: str, title: str | None = None) -> str:
    """OUT/report/index.html for one job's OUT."""
    body, _ = job_body(out_dir)
    title = title or f"ivl report: {os.path.basename(os.path.abspath(out_dir))}"
    return _write(os.path.join(out_dir, "report", "index.html"), _page(title, body))


CHAIN_KEYS = ("input", "kept", "rejected", "review", "samples", "packs", "token_fill", "tile_fill",
              "final_loss", "steps", "seconds")


def write_chain_report(out_dir: str, jobs: dict[str, str], title: str = "ivl chain report") -> str:
    """OUT/report/index.html for a chain (e.g. ingest -> curate -> pack -> train): one table over the jobs,
    then each job's own report inline."""
    overview, sections = {}, []
    for name, d in jobs.items():
        body, summary = job_body(d)
        overview[name] = {k: summary[k] for k in CHAIN_KEYS if k in summary}
        sections.append(f'<h2 id="{_e(name)}">{_e(name)}: {_e(os.path.abspath(d))}</h2>\n{body}')
    nav = " → ".join(f'<a href="#{_e(n)}">{_e(n)}</a>' for n in jobs)
    body = f"<p>{nav}</p>" + _table(overview, "the chain") + "\n".join(sections)
    return _write(os.path.join(out_dir, "report", "index.html"), _page(title, body))
