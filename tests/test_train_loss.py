"""A packed row trains exactly like its samples run one by one (arXiv 2412.05271: loss
reweighting; §4.2 packing step 3)."""

from __future__ import annotations

import pytest
import torch
from conftest_train import pack_samples, random_samples
from hypothesis import given, settings
from hypothesis import strategies as st

from model.build import from_preset
from model.tiling import TOKENS_PER_TILE
from train import attention as A
from train import loss as L
from train.data import prepare_pack, to_device


@pytest.fixture(scope="module")
def packed(train_tok):
    """One packed row: image, text, image (2-tile max) samples, prepared like training does."""
    import numpy as np

    samples = random_samples(train_tok, 3, seed=3, image_every=2, max_tiles=2)
    row = pack_samples(samples)
    batch = to_device({**prepare_pack(row, np.random.default_rng(0)), "plan_index": 0}, torch.device("cpu"))
    return samples, batch


def _piece(batch: dict, k: int, image_token_id: int) -> dict:
    """The k-th sample of a packed batch, alone (its own tiles, or the dummy tile if it has none)."""
    cu = batch["cu_seqlens"].tolist()
    a, b = cu[k], cu[k + 1]
    ids = batch["input_ids"]
    tiles_before = int((ids[:a] == image_token_id).sum()) // TOKENS_PER_TILE
    tiles = int((ids[a:b] == image_token_id).sum()) // TOKENS_PER_TILE
    pixels = (
        batch["pixel_values"][tiles_before : tiles_before + tiles]
        if tiles
        else torch.zeros_like(batch["pixel_values"][:1])
    )
    return {
        "input_ids": ids[a:b],
        "labels": batch["labels"][a:b],
        "position_ids": batch["position_ids"][a:b],
        "cu_seqlens": torch.tensor([0, b - a], dtype=torch.int32),
        "pixel_values": pixels,
        "has_image": tiles > 0,
    }


def _weighted_sum(model, batch, averaging):
    h = A.packed_hidden_states(model, batch)
    t = L.shift_targets(batch["labels"], batch["cu_seqlens"])
    w = L.token_weights(t, batch["cu_seqlens"], averaging)
    return L.weighted_cross_entropy(h, model.lm_head.weight, t, w, chunk_size=64), w.sum()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", [A.SDPA, A.VARLEN])
@pytest.mark.parametrize("averaging", ["token", "sample", "square"])
def test_packed_row_equals_samples_alone(train_tok, packed, averaging, mode):
    samples, batch = packed
    torch.manual_seed(0)
    model = from_preset("tiny", train_tok).float()
    A.set_packed_attention(model, mode)

    num, den = _weighted_sum(model, batch, averaging)
    (num / den).backward()
    packed_loss, packed_grads = float((num / den).detach()), _grads(model)
    model.zero_grad(set_to_none=True)

    parts = [
        _weighted_sum(model, _piece(batch, k, model.config.image_token_id), averaging)
        for k in range(len(samples))
    ]
    total_den = sum(d for _, d in parts)
    assert torch.allclose(total_den, den)  # the weights of a sample do not depend on its neighbours
    alone = sum(n for n, _ in parts) / total_den
    alone.backward()
    alone_grads = _grads(model)

    assert float(alone) == pytest.approx(packed_loss, rel=1e-4)
    assert packed_grads.keys() == alone_grads.keys()
    scale = max(g.abs().max().item() for g in packed_grads.values())
    for name, g in packed_grads.items():
        # rtol 1e-4 per element; near-zero entries are held to 1e-4 of the tensor's largest entry
        # (fp32 sums in a different order differ by ~1e-7 of the scale, not of each entry); a gradient
        # that is 0 in exact arithmetic (the key bias: softmax ignores a constant shift) is fp32 noise
        # ~1e-13, held to 1e-7 of the model's largest gradient
        atol = max(1e-4 * g.abs().max().item(), 1e-7 * scale)
        torch.testing.assert_close(g, alone_grads[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    # the projector and vision tower really received image gradients
    assert packed_grads["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0


def test_refuses_position_ids_that_would_mix_samples(train_tok, packed):
    _, batch = packed
    model = from_preset("tiny", train_tok).float()
    A.set_packed_attention(model, A.SDPA)
    running = dict(batch, position_ids=torch.arange(batch["input_ids"].numel()))
    with pytest.raises(A.PackedAttentionError):
        A.packed_hidden_states(model, running)
    # and it matters: without the check, the continuous positions would let the last sample see the others
    model.model.language_model.config._attn_implementation = A.SDPA
    with torch.no_grad():
        good = A.packed_hidden_states(model, batch)
        A_check = A.check_packed
        try:
            A.check_packed = lambda *a, **k: None
            mixed = A.packed_hidden_states(model, running)
        finally:
            A.check_packed = A_check
    last = slice(int(batch["cu_seqlens"][-2]), None)
    assert not torch.allclose(good[last], mixed[last], atol=1e-4)


def test_refuses_non_exact_attention_path(train_tok, packed):
    _, batch = packed
    model = from_preset("tiny", train_tok).float()
    with pytest.raises(A.PackedAttentionError):
        A.set_packed_attention(model, "flash_attention_2")
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(A.PackedAttentionError):
        A.check_packed(model, batch["position_ids"], batch["cu_seqlens"])


def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    wt = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::3] = L.IGNORE
    w = torch.rand(50) * (targets != L.IGNORE)
    chunked = L.weighted_cross_entropy(h, wt, targets, w, chunk_size=7)
    gh, gw = torch.autograd.grad(chunked, (h, wt))
    keep = targets != L.IGNORE
    full = (
        torch.nn.functional.cross_entropy(h @ wt.T, targets, reduction="none", ignore_index=L.IGNORE) * w
    )[keep].sum()
    fh, fw = torch.autograd.grad(full, (h, wt))
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(gh, fh)
    torch.testing.assert_close(gw, fw)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=6))
def test_weights_per_sample(pieces):
    """token: weight = supervised count; sample: each supervised sample sums to 1; square: sqrt(x)."""
    labels = torch.tensor([5 if on else L.IGNORE for p in pieces for on in p])
    cu = torch.tensor([0, *torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()], dtype=torch.int32)
    t = L.shift_targets(labels, cu)
    for k in range(len(pieces)):
        a, b = int(cu[k]), int(cu[k + 1])
        x = int((t[a:b] != L.IGNORE).sum())
        assert int(t[b - 1]) == L.IGNORE  # never predict across a sample boundary
        for avg, expected in (("token", x), ("sample", 1.0 if x else 0.0), ("square", x**0.5)):
            assert float(L.token_weights(t, cu, avg)[a:b].sum()) == pytest.approx(expected, rel=1e-5)
