"""The curate report's PNGs, drawn from merged markers only (pipeline/curate_plots.py)."""

from __future__ import annotations

from PIL import Image

from pipeline.curate_plots import write_plots
from pipeline.jobs import Marker, merge


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


def test_report_pngs_from_merged_markers(tmp_path):
    """One PNG per figure, each a real image, with nothing but the merged markers to read."""
    write_plots(str(tmp_path), merged_summary(), {"score_quality": [0.5]})
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["hist_score_lang.png", "hist_score_quality.png", "kept_fraction_by_source.png",
                    "rejected_by_rule.png", "review_by_rule.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no shard was needed
    for name in pngs:
        with Image.open(tmp_path / "report" / name) as im:
            assert im.format == "PNG" and im.size[0] >= 500, (name, im.size)

