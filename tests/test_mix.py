"""`ivl mix`: the solver against InternVL's own repeat_time semantics, and the whole plan -> ingest -> pack
chain on the bundled sample, where the packed token shares are measured from the packed rows."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import SAMPLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.mix import Dataset, MixTargets, load_targets, materialise, solve_repeats
from pipeline.readers import ConfigError


def _dataset(cache, name: str, category: str, per_line: list[int], unit: int = 7) -> Dataset:
    d = Dataset(name, {"root": "", "annotation": f"{name}.jsonl"}, category, f"{name}-x")
    os.makedirs(os.path.join(cache, d.digest), exist_ok=True)
    for start in range(0, len(per_line), unit):
        part = np.array(per_line[start: start + unit], np.int64)
        np.save(os.path.join(cache, d.digest, f"{start:012d}.npy"), part)
        d.units.append((start, start + len(part), int(part.sum())))
    d.lines = len(per_line)
    return d


def internvl_loader_tokens(meta: dict, per_line: dict[str, list[int]]) -> dict[str, int]:
    """Tokens per original dataset as InternVL's loader takes the lines: the first int(N*r) below 1, N*r above."""
    out: dict[str, int] = {}
    for name, spec in meta.items():
        r = spec["repeat_time"]
        base = name.split("_part")[0]
        lines = per_line[base]
        n = len(lines)
        if r < 1:
            took = sum(lines[: int(n * r)])
        else:
            assert isinstance(r, int), f"{name}: repeat_time {r} > 1 must be an integer for InternVL"
            took = r * sum(lines)
        out[base] = out.get(base, 0) + took
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["caption", "ocr", "math"]),
                          st.lists(st.integers(20, 400), min_size=5, max_size=60)), min_size=3, max_size=6),
       st.floats(0.5, 2.5))
def test_plan_is_exact_under_internvl_semantics(tmp_path_factory, spec, scale):
    cache = str(tmp_path_factory.mktemp("cache"))
    cats = sorted({c for c, _ in spec})
    datasets = [_dataset(cache, f"d{i}", c, lines) for i, (c, lines) in enumerate(spec)]
    per_cat = {c: sum(d.tokens for d in datasets if d.category == c) for c in cats}
    budget = int(scale * sum(per_cat.values()))
    shares = {c: per_cat[c] / sum(per_cat.values()) for c in cats}  # reachable within max_repeat 4
    t = MixTargets(budget_tokens=budget, categories=shares)
    repeats, notes = solve_repeats(datasets, t)
    meta, achieved = materialise(datasets, repeats, cache)
    loader = internvl_loader_tokens(meta, {d.name: np.concatenate(
        [np.load(os.path.join(cache, d.digest, f"{s:012d}.npy")) for s, _, _ in d.units]).tolist() for d in datasets})
    assert {k: v for k, v in loader.items()} == {k: v for k, v in achieved.items() if v}  # exact, not estimated
    biggest = max(max(lines) for _, lines in spec)
    for c in cats:  # each category within one line of its goal per dataset
        got = sum(achieved[d.name] for d in datasets if d.category == c)
        assert abs(got - shares[c] * budget) <= biggest * sum(d.category == c for d in datasets)
        assert notes[c]["status"] == "ok"


def test_infeasible_targets_say_what_can_be_reached(tmp_path):
    cache = str(tmp_path)
    small = _dataset(cache, "small", "ocr", [100] * 10)  # 1,000 tokens, at most 4,000 at max_repeat 4
    big = _dataset(cache, "big", "caption", [100] * 200)
    t = MixTargets(budget_tokens=20_000, categories={"ocr": 0.5, "caption": 0.5})
    repeats, notes = solve_repeats([small, big], t)
    assert repeats["small"] == 4 and notes["ocr"]["reachable_tokens"] == 4000
    assert notes["ocr"]["status"].startswith("below target") and notes["caption"]["status"] == "ok"
    assert math.isclose(repeats["big"], 0.5)


def test_bad_targets_fail_with_one_line(tmp_path):
    p = tmp_path / "mix.yaml"
    p.write_text(yaml.safe_dump({"budget_tokens": 1000, "categories": {"a": 0.7, "b": 0.2}}))
    with pytest.raises(ConfigError, match="sum to 0.9"):
        load_targets(str(p))
    p.write_text(yaml.safe_dump({"budget_tokens": 1000, "categories": {"a": 1.0}, "presets": {"s1": {"budget_tokens": 5}}}))
    assert load_targets(str(p), "s1").budget_tokens == 5
    with pytest.raises(ConfigError, match="no preset 'x'"):
        load_targets(str(p), "x")
    ivl = os.path.join(os.path.dirname(sys.executable), "ivl")
    r = subprocess.run([ivl, "mix", "--meta", str(SAMPLE / "meta.json"), "--targets", str(p), "--tokenizer", str(p),
                        "--out", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "category 'captioning', which the targets give no share" in r.stderr
    assert r.stderr.count("\n") == 1


WEIGHTS = {"captioning": 1.5, "comparison": 0.7, "poetry": 2.0, "general": 1.0}  # moves each share off its natural


@pytest.mark.slow
def test_mix_then_ingest_and_pack_reach_the_shares(tmp_path, gguf, ray_local):
    """The bundled sample (real Tux Paint captions in English and Chinese, comparisons, fortunes, Tang poems),
    four categories, a budget of ~2.2x its tokens: after ingest + pack of the planned meta, the packed token
    shares per category are within 2 points of the targets and the total within 3% of the budget."""
    from pipeline.ingest import run_ingest
    from pipeline.mix import run_mix
    from pipeline.pack_job import run_pack

    src = tmp_path / "src"
    shutil.copytree(SAMPLE, src, ignore=shutil.ignore_patterns("*.py"))
    mix = {"max_repeat": 6}
    meta = json.loads((src / "meta.json").read_text())
    meta["tuxpaint_compare"]["category"] = "comparison"
    meta["tang_poems"]["category"] = "poetry"
    (src / "meta.json").write_text(json.dumps(meta))
    # targets from a first count: each category's natural share reweighted, a budget of ~2.2x the tokens
    even = {c: 1 / len(WEIGHTS) for c in WEIGHTS}
    probe = run_mix(str(src / "meta.json"), MixTargets(budget_tokens=10**6, categories=even), gguf,
                    str(tmp_path / "probe.json"), cache=str(tmp_path / "cache"))
    once = {c: sum(d["tokens_once"] for d in probe["datasets"].values() if d["category"] == c) for c in WEIGHTS}
    weighted = {c: WEIGHTS[c] * once[c] for c in WEIGHTS}
    targets = {c: round(w / sum(weighted.values()), 4) for c, w in weighted.items()}
    targets["general"] = round(1 - sum(v for c, v in targets.items() if c != "general"), 4)
    mix.update(budget_tokens=int(2.2 * sum(once.values())), categories=targets)
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    s = run_mix(str(src / "meta.json"), load_targets(str(tmp_path / "mix.yaml")), gguf,
                str(src / "planned.json"), cache=str(tmp_path / "cache"))
    assert s["datasets_from_cache"] == len(meta) and not s["infeasible"]
    assert os.path.exists(tmp_path / "src" / "planned_report" / "report" / "mix_shares.png")
    assert "mix_shares.png" in (tmp_path / "src" / "planned_report" / "report" / "index.html").read_text()
    planned = json.loads((src / "planned.json").read_text())
    for spec in planned.values():
        assert spec["repeat_time"] < 1 or isinstance(spec["repeat_time"], int)
    run_ingest([str(src / "planned.json")], str(tmp_path / "ingest"))
    run_pack(str(tmp_path / "ingest"), str(tmp_path / "pack"), gguf)
    category = {name: spec["category"] for name, spec in planned.items()}
    tokens = dict.fromkeys(targets, 0)
    for f in sorted((tmp_path / "pack" / "kept").glob("*.parquet")):
        t = pq.read_table(f, columns=["sample_ids", "cu_seqlens"]).to_pylist()
        for row in t:
            lens = np.diff(row["cu_seqlens"])
            for sid, n in zip(row["sample_ids"], lens):
                tokens[category[sid.split("/")[0]]] += int(n)
    total = sum(tokens.values())
    assert abs(total - mix["budget_tokens"]) <= 0.03 * mix["budget_tokens"], (total, mix["budget_tokens"])
    for c, share in targets.items():
        assert abs(tokens[c] / total - share) <= 0.02, (c, tokens[c] / total, share)
