"""`ivl mix`: token shares per category -> each dataset's `repeat_time` in an InternVL meta JSON.

InternVL 2.5 sets its mixtures by category and realises them through `repeat_time` (§4, Tables 4-5).
Here a team states the shares and a token budget, and the plan is solved from exact counts:
1. **Count** each dataset's training tokens as `ivl pack` will: the same readers (`pipeline.readers`), the
   same tokenizer, template, tiling and `max_dynamic_patch` (`pipeline.pack_job.tokenize_table`); rows that
   ingest or pack would reject count 0. One Ray task per read unit (an actor pool holds the tokenizer); each
   writes its per-line token counts to the cache (`<cache>/<dataset digest>/<start>.npy`) and returns only
   its total, so the driver holds a few numbers per unit. A dataset whose digest (annotation file size and
   mtime, root, max_dynamic_patch, tokenizer, budgets) is cached is not read again.
2. **Solve**: category c gets G_c = share_c * budget tokens; its datasets share one repeat factor r (so
   they keep their natural proportions) with each dataset's repeat clipped to [min_repeat, max_repeat]:
   r is found by bisection on sum_d clip(r) * T_d = G_c. A category that cannot reach G_c within the
   limits is reported with the share it can reach.
3. **Write**: InternVL's loader asserts an integer `repeat_time` above 1 and keeps the first int(N*r) lines
   below 1, so a repeat of k + f becomes an entry with `repeat_time: k` and a second entry on the same
   annotation with `repeat_time` (m + 0.5) / N, m the prefix of lines whose exact token count is closest
   to f * T_d (found from the cached per-line counts). The achieved tokens are therefore exact sums of
   counted lines, not estimates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.readers import ConfigError


class DatasetLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_repeat: float = Field(4.0, gt=0, description="largest repeat of a dataset (InternVL caps upsampling)")
    min_repeat: float = Field(0.0, ge=0, description="smallest repeat (0 lets a dataset be left out)")


class MixTargets(BaseModel):
    """MIX.yaml: what the mixture should be."""

    model_config = ConfigDict(extra="forbid")
    budget_tokens: int = Field(..., gt=0, description="training tokens (text + image tokens of the packed rows)")
    categories: dict[str, float] = Field(..., description="category -> share of the budget (shares sum to 1)")
    category_of: dict[str, str] = Field(default_factory=dict,
                                        description="dataset -> category, for meta entries without `category`")
    max_repeat: float = Field(4.0, gt=0, description="default largest repeat per dataset")
    min_repeat: float = Field(0.0, ge=0, description="default smallest repeat per dataset")
    limits: dict[str, DatasetLimits] = Field(default_factory=dict, description="per-dataset repeat limits")
    max_tokens: int = Field(16384, description="pack's token budget per row (decides what pack rejects)")
    max_tiles: int = Field(48, description="pack's tile budget per row")
    presets: dict[str, dict] = Field(default_factory=dict,
                                     description="named overrides (e.g. per training stage), chosen with --preset")

    @model_validator(mode="after")
    def _shares(self) -> MixTargets:
        if any(s < 0 for s in self.categories.values()):
            raise ValueError("category shares must be >= 0")
        if abs(sum(self.categories.values()) - 1) > 1e-6:
            raise ValueError(f"category shares sum to {sum(self.categories.values()):.6g}, not 1")
        return self


def load_targets(path: str, preset: str | None = None) -> MixTargets:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if preset is not None:
            presets = raw.get("presets") or {}
            if preset not in presets:
                raise ValueError(f"no preset {preset!r} (have: {', '.join(presets) or 'none'})")
            raw = {**raw, **presets[preset]}
        return MixTargets(**raw)
    except OSError as e:
        raise ConfigError(f"targets {path}: {e.strerror}") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"targets {path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise ConfigError(f"targets {path}: {str(e).splitlines()[0]}") from None


# ---- planning what to count (driver, no Ray) ------------------------------------------------------

@dataclass
class Dataset:
    name: str
    spec: dict  # the meta entry as the user wrote it
    category: str
    digest: str
    tasks: list[dict] = field(default_factory=list)
    units: list[tuple[int, int, int]] = field(default_factory=list)  # (start, stop, tokens) per read unit
    lines: int = 0

    @property
    def tokens(self) -> int:
        return sum(u[2] for u in self.units)


def _tokenizer_digest(path: str) -> str:
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def plan_datasets(meta_path: str, targets: MixTargets, tokenizer: str, rows_per_unit: int = 1000) -> list[Dataset]:
    """Read the meta JSON, give every dataset its category and read units (at repeat_time 1)."""
    from pipeline.readers import entries_from_sources, plan_tasks

    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"meta file {meta_path}: {e}") from None
    if not isinstance(meta, dict) or not meta:
        raise ConfigError(f"meta file {meta_path}: expected an object of datasets")
    entries = entries_from_sources([meta_path])
    if len(entries) != len(meta):
        raise ConfigError(f"meta file {meta_path}: {len(meta)} datasets but {len(entries)} sources read")
    tok = _tokenizer_digest(tokenizer)
    out = []
    for (name, spec), entry in zip(meta.items(), entries):
        category = spec.get("category") or targets.category_of.get(name)
        if not category:
            raise ConfigError(f"dataset {name!r} has no category: add `category` to its meta entry or "
                              f"`category_of: {{{name}: ...}}` to the targets")
        if category not in targets.categories:
            raise ConfigError(f"dataset {name!r} is in category {category!r}, which the targets give no share "
                              f"(have: {', '.join(targets.categories)}; a share of 0 leaves it out)")
        if entry.kind != "jsonl":
            raise ConfigError(f"dataset {name!r}: annotation {entry.path} is {entry.kind}; InternVL's loader and "
                              f"ivl mix read JSONL annotations")
        entry.repeat_time = 1  # count every line once; the plan sets the repeats
        st = os.stat(entry.path)
        key = json.dumps([entry.path, st.st_size, st.st_mtime_ns, entry.root, entry.max_dynamic_patch, entry.layout,
                          tok, targets.max_tokens, targets.max_tiles], sort_keys=True)
        digest = f"{entry.source}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        out.append(Dataset(name, spec, category, digest, plan_tasks([entry], rows_per_unit)))
    return out


# ---- counting (Ray) --------------------------------------------------------------------------------

class TokenCounter:
    """A Ray Data actor: loads the tokenizer once, counts one read unit's tokens per line."""

    def __init__(self, tokenizer: str, max_tokens: int, max_tiles: int):
        from model.tokenizer import load_tokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tok = load_tokenizer(tokenizer)
        self.max_tokens, self.max_tiles = max_tokens, max_tiles

    def __call__(self, batch: dict) -> dict:
        from pipeline.io import atomic_write_bytes
        from pipeline.pack_job import tokenize_table
        from pipeline.readers import read_task, rows_to_tables

        out = {"digest": [], "start": [], "stop": [], "tokens": []}
        for task_json, digest, cache in zip(batch["task"], batch["digest"], batch["cache"]):
            task = json.loads(task_json)
            start, stop = task["start"], task["stop"]  # JSONL units: a line range
            kept, _rejected = read_task(task)
            per_line = np.zeros(stop - start, np.int64)
            if kept:
                table, _ = rows_to_tables(kept, [])
                t = tokenize_table(table, self.tok, max_tokens=self.max_tokens, max_tiles=self.max_tiles)
                lens = [len(x) for x in t.column("input_ids").to_pylist()]
                for rid, why, n in zip(t.column("id").to_pylist(), t.column("reject_reason").to_pylist(), lens):
                    line = int(rid.rsplit("/", 1)[1])  # ids are `<source>/<line>` (pipeline.readers)
                    if not why and start <= line < stop:
                        per_line[line - start] = n
            buf = _npy_bytes(per_line)
            atomic_write_bytes(os.path.join(cache, digest, f"{start:012d}.npy"), buf)
            out["digest"].append(digest)
            out["start"].append(start)
            out["stop"].append(stop)
            out["tokens"].append(int(per_line.sum()))
        return out


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _cached_units(cache: str, ds: Dataset) -> list[tuple[int, int, int]] | None:
    try:
        with open(os.path.join(cache, ds.digest, "units.json")) as f:
            return [tuple(u) for u in json.load(f)]
    except (OSError, json.JSONDecodeError):
        return None


def count_tokens(datasets: list[Dataset], tokenizer: str, targets: MixTargets, cache: str,
                 actors: int | None = None) -> int:
    """Fill every dataset's units from the cache or a Ray job; returns how many datasets were counted now."""
    import ray

    from pipeline.io import atomic_write_bytes

    todo = []
    for ds in datasets:
        units = _cached_units(cache, ds)
        if units is not None:
            ds.units = units
        else:
            todo.append(ds)
    rows = [{"task": json.dumps(t), "digest": ds.digest, "cache": cache} for ds in todo for t in ds.tasks]
    if rows:
        n = actors or max(1, min(len(rows), int(ray.cluster_resources().get("CPU", 1))))
        res = (ray.data.from_items(rows, override_num_blocks=len(rows))
               .map_batches(TokenCounter, fn_constructor_kwargs=dict(tokenizer=tokenizer, max_tokens=targets.max_tokens,
                                                                    max_tiles=targets.max_tiles),
                            batch_size=1, concurrency=(1, n))
               .take_all())  # one small row per read unit: (digest, start, stop, tokens)
        by_digest: dict[str, list] = {}
        for r in res:
            by_digest.setdefault(r["digest"], []).append((int(r["start"]), int(r["stop"]), int(r["tokens"])))
        for ds in todo:
            ds.units = sorted(by_digest.get(ds.digest, []))
            atomic_write_bytes(os.path.join(cache, ds.digest, "units.json"), json.dumps(ds.units).encode())
    for ds in datasets:
        ds.lines = ds.units[-1][1] if ds.units else 0
    return len(todo)


def prefix_tokens(cache: str, ds: Dataset, goal: float) -> tuple[int, int]:
    """The prefix of m lines whose token count is closest to `goal`: (m, its tokens). Reads one unit's counts."""
    done = 0
    for start, _stop, tokens in ds.units:
        if done + tokens >= goal:
            per_line = np.load(os.path.join(cache, ds.digest, f"{start:012d}.npy"))
            cum = done + np.concatenate([[0], np.cumsum(per_line)])
            j = int(np.argmin(np.abs(cum - goal)))
            return start + j, int(cum[j])
        done += tokens
    return ds.lines, done


# ---- solving ---------------------------------------------------------------------------------------

def _limits(targets: MixTargets, name: str) -> tuple[float, float]:
    lim = targets.limits.get(name)
    lo = lim.min_repeat if lim else targets.min_repeat
    hi = lim.max_repeat if lim else targets.max_repeat
    if lo > hi:
        raise ConfigError(f"dataset {name!r}: min_repeat {lo} > max_repeat {hi}")
    return lo, hi


def solve_repeats(datasets: list[Dataset], targets: MixTargets) -> tuple[dict[str, float], dict[str, dict]]:
    """Repeat per dataset, and per category what was asked and what the limits allow."""
    repeats: dict[str, float] = {}
    notes: dict[str, dict] = {}
    for cat, share in targets.categories.items():
        members = [d for d in datasets if d.category == cat]
        goal = share * targets.budget_tokens
        bounds = {d.name: _limits(targets, d.name) for d in members}
        total = lambda r, ms=members, b=bounds: sum(min(max(r, b[d.name][0]), b[d.name][1]) * d.tokens for d in ms)  # noqa: E731
        hi_r = max((b[1] for b in bounds.values()), default=0.0)
        lo_tokens, hi_tokens = total(0.0), total(hi_r)
        if not members or hi_tokens == 0:
            r = 0.0
            status = "no tokens" if goal > 0 else "ok"
        elif goal >= hi_tokens:
            r, status = hi_r, ("ok" if math.isclose(goal, hi_tokens) else "below target: every dataset at max_repeat")
        elif goal <= lo_tokens:
            r, status = 0.0, ("ok" if math.isclose(goal, lo_tokens) else "above target: every dataset at min_repeat")
        else:
            a, b = 0.0, hi_r
            for _ in range(100):  # bisection: total() is monotone in r
                m = (a + b) / 2
                a, b = (m, b) if total(m) < goal else (a, m)
            r, status = (a + b) / 2, "ok"
        for d in members:
            repeats[d.name] = min(max(r, bounds[d.name][0]), bounds[d.name][1]) if d.tokens else 0.0
        notes[cat] = {"target_tokens": goal, "reachable_tokens": min(max(goal, lo_tokens), hi_tokens) if members else 0,
                      "status": status}
    return repeats, notes


def materialise(datasets: list[Dataset], repeats: dict[str, float], cache: str) -> tuple[dict, dict[str, int]]:
    """The planned meta JSON (integer repeats, a prefix entry for each fraction) and each dataset's tokens."""
    meta: dict[str, dict] = {}
    achieved: dict[str, int] = {}
    names = {d.name for d in datasets}
    carry: dict[str, float] = {}  # per category: what earlier prefixes overshot, so the category sum stays close
    for d in datasets:
        r = repeats.get(d.name, 0.0)
        whole = int(math.floor(r + 1e-9))
        goal = (r - whole) * d.tokens - carry.get(d.category, 0.0)
        if goal < 0 and whole >= 1:  # borrow from the whole repeats
            whole -= 1
            goal += d.tokens
        m, frac_tokens = prefix_tokens(cache, d, max(goal, 0.0)) if d.lines else (0, 0)
        carry[d.category] = carry.get(d.category, 0.0) + whole * d.tokens + frac_tokens - r * d.tokens
        if m >= d.lines and d.lines:  # the prefix is the whole file: one more whole repeat
            whole, m, frac_tokens = whole + 1, 0, 0
        achieved[d.name] = whole * d.tokens + frac_tokens
        base = {k: v for k, v in d.spec.items() if k not in ("repeat_time", "length")}
        base["category"] = d.category
        if whole >= 1:
            meta[d.name] = {**copy.deepcopy(base), "repeat_time": whole, "length": d.lines}
        if m > 0:
            name = d.name if whole == 0 else _fresh(f"{d.name}_part", names | set(meta))
            # InternVL keeps the first int(N * r) lines: (m + 0.5) / N gives exactly m
            meta[name] = {**copy.deepcopy(base), "repeat_time": round((m + 0.5) / d.lines, 12), "length": d.lines}
    return meta, achieved


def _fresh(name: str, taken: set[str]) -> str:
    k, out = 1, name
    while out in taken:
        k += 1
        out = f"{name}{k}"
    return out


# ---- the job ---------------------------------------------------------------------------------------

def run_mix(meta_path: str, targets: MixTargets, tokenizer: str, out: str, cache: str | None = None,
            report_dir: str | None = None, datasets: list[Dataset] | None = None) -> dict:
    """Count (Ray), solve, write the planned meta JSON and a report; returns the report's summary."""
    import time

    from pipeline.html_report import write_job_report
    from pipeline.io import atomic_write_bytes
    from pipeline.report import write_summary

    t0 = time.time()
    out = os.path.abspath(out)
    cache = cache or os.path.join(os.path.dirname(out), ".ivl-mix-cache")
    report_dir = report_dir or os.path.splitext(out)[0] + "_report"
    datasets = datasets if datasets is not None else plan_datasets(meta_path, targets, tokenizer)
    counted = count_tokens(datasets, tokenizer, targets, cache)
    repeats, notes = solve_repeats(datasets, targets)
    meta, achieved = materialise(datasets, repeats, cache)
    # the planned file sits beside the annotations' meta: relative roots/annotations stay valid
    meta = _rebase(meta, os.path.dirname(os.path.abspath(meta_path)), os.path.dirname(out))
    atomic_write_bytes(out, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    total = sum(achieved.values())
    per_cat = {c: sum(achieved[d.name] for d in datasets if d.category == c) for c in targets.categories}
    summary = {
        "budget_tokens": targets.budget_tokens, "planned_tokens": total,
        "budget_error": (total - targets.budget_tokens) / targets.budget_tokens,
        "categories": {c: {"target_share": targets.categories[c], "achieved_share": per_cat[c] / total if total else 0,
                           "tokens": per_cat[c], **notes[c]} for c in targets.categories},
        "datasets": {d.name: {"category": d.category, "lines": d.lines, "tokens_once": d.tokens,
                              "repeat": repeats.get(d.name, 0.0), "planned_tokens": achieved[d.name],
                              "share": achieved[d.name] / total if total else 0} for d in datasets},
        "infeasible": sorted(c for c, n in notes.items() if n["status"] != "ok"),
        "datasets_counted": counted, "datasets_from_cache": len(datasets) - counted,
        "planned_meta": out, "seconds": round(time.time() - t0, 2),
    }
    os.makedirs(os.path.join(report_dir, "report"), exist_ok=True)
    write_summary(report_dir, summary)
    plot_shares(summary, os.path.join(report_dir, "report", "mix_shares.png"))
    write_job_report(report_dir, title=f"ivl mix: {os.path.basename(out)}")
    return summary


def _rebase(meta: dict, src_dir: str, dst_dir: str) -> dict:
    if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
        return meta
    out = {}
    for name, spec in meta.items():
        spec = dict(spec)
        for k in ("root", "annotation"):
            if k in spec and spec[k] is not None and not os.path.isabs(spec[k]):
                spec[k] = os.path.relpath(os.path.join(src_dir, spec[k] or "."), dst_dir)
        out[name] = spec
    return out


def plot_shares(summary: dict, path: str) -> str:
    """Target against achieved share per category, and each dataset's share (a PNG a person looks at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(summary["categories"])
    ds = list(summary["datasets"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.4 * max(len(cats), len(ds)) + 2))
    y = np.arange(len(cats))
    a.barh(y - 0.2, [summary["categories"][c]["target_share"] for c in cats], 0.4, label="target", color="#8da0cb")
    a.barh(y + 0.2, [summary["categories"][c]["achieved_share"] for c in cats], 0.4, label="planned", color="#66c2a5")
    a.set_yticks(y, cats)
    a.set_xlabel("share of tokens")
    a.set_title(f"categories (budget {summary['budget_tokens']:,}, planned {summary['planned_tokens']:,})")
    a.legend()
    y = np.arange(len(ds))
    b.barh(y, [summary["datasets"][d]["share"] for d in ds], color="#fc8d62")
    b.set_yticks(y, [f"{d} (x{summary['datasets'][d]['repeat']:.2f})" for d in ds])
    b.set_xlabel("share of tokens")
    b.set_title("datasets (repeat)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
