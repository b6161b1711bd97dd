"""The curate report's PNGs: drawn from merged markers only, the same bytes whether the driver draws
them all or shares them with Ray tasks (pipeline/curate_plots.py)."""

from __future__ import annotations

import hashlib

from pipeline.curate_plots import draw, figures, write_plots
from pipeline.jobs import Histogram, Marker, merge


def merged_summary() -> dict:
    """Two units' markers, merged as run_curate merges them (real counts and score histograms)."""
    markers = []
    for key, (kept, review, scores) in {"a": (3, 1, [0.1, 0.52, 0.9, 0.95]), "b": (2, 0, [0.3, 0.31])}.items():
        m = Marker(key=key, input=kept + review + 1)
        m.add_rows("kept", ["web"] * kept)
        m.add_rows("review", ["web"] * review, ["text_rules:dup_line_frac"] * review)
        m.add_rows("rejected", ["chat"], ["structure:no_text"])
        m.add_scores("score_quality", scores)
        m.add_scores("score_lang", [0.99] * len(scores))
        markers.append(m)
    return merge(markers)


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "report").glob("*.png"))}


def test_figures_come_from_the_merged_counts():
    summary = merged_summary()
    figs = figures("OUT", summary, {"score_quality": [0.5]})
    paths = [args[1] if fn.__name__ == "bar_chart" else args[2] for fn, args in figs]
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "rejected_by_rule.png", "review_by_rule.png", "kept_fraction_by_source.png",
        *(f"hist_{c}.png" for c in summary["histograms"])]
    hist = dict(zip(paths, figs))["OUT/report/hist_score_quality.png"][1]
    expect = Histogram().add([0.1, 0.52, 0.9, 0.95, 0.3, 0.31]).values_and_counts()
    assert (hist[0], hist[1], hist[4]) == (*expect, [0.5])
    assert dict(zip(paths, figs))["OUT/report/kept_fraction_by_source.png"][1][0] == {"chat": 0.0, "web": 0.833}  # 5 of 6


def test_ray_tasks_draw_the_same_pngs_as_the_driver(ray_local, tmp_path):
    summary = merged_summary()
    thresholds = {"score_quality": [0.5]}
    draw(figures(str(tmp_path / "serial"), summary, thresholds))
    write_plots(str(tmp_path / "shared"), summary, thresholds)  # ray_local has 4 CPUs: 3 tasks draw too
    serial, shared = digests(tmp_path / "serial"), digests(tmp_path / "shared")
    assert set(serial) == {"rejected_by_rule.png", "review_by_rule.png", "kept_fraction_by_source.png",
                           "hist_score_quality.png", "hist_score_lang.png"}
    assert shared == serial
