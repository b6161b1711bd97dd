"""Tokenizer loading and the internvl2_5 template, on the real SmolLM2-135M-Instruct tokenizer (GGUF)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizer import (
    IGNORE_INDEX,
    INTERNVL_SYSTEM_PROMPT,
    INTERNVL_TOKENS,
    load_tokenizer,
    render_batch,
    render_sample,
)


def chatml(system, turns) -> str:
    role = {"human": "user", "gpt": "assistant"}
    s = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return s + "".join(f"<|im_start|>{role[t['from']]}\n{t['value']}<|im_end|>\n" for t in turns)


def test_gguf_load_adds_internvl_special_tokens(tok, tmp_path):
    ids = tok.convert_tokens_to_ids(list(INTERNVL_TOKENS))
    assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids
    assert tok("<img><IMG_CONTEXT></img>", add_special_tokens=False)["input_ids"] == ids[:1] + ids[2:3] + ids[1:2]
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    tok.save_pretrained(tmp_path)  # what `ivl pack` saves for training: the same vocabulary back
    again = load_tokenizer(str(tmp_path))
    assert len(again) == len(tok) and again.convert_tokens_to_ids(list(INTERNVL_TOKENS)) == ids


def test_chatml_tokens_are_added_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    t = load_tokenizer(str(tmp_path))
    for token in ("<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS):
        assert t.convert_tokens_to_ids(token) not in (None, 0)
    ids, labels, _ = render_sample([{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}], [], t, None)
    assert ids.tolist().count(t.convert_tokens_to_ids("<|im_end|>")) == 2


def test_render_matches_the_template_and_masks_all_but_answers(tok):
    conv = [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A penguin on ice."},
        {"from": "human", "value": "And the colour?"},
        {"from": "gpt", "value": "Black and white."},
    ]
    ids, labels, spans = render_sample(conv, [3], tok)
    assert ids.dtype == np.int32 and labels.shape == ids.shape
    image = "<img>" + "<IMG_CONTEXT>" * (256 * 3) + "</img>"
    expected = chatml(INTERNVL_SYSTEM_PROMPT, conv).replace("<image>", image)
    assert tok.decode(ids) == expected
    assert ids.tolist() == tok(expected, add_special_tokens=False)["input_ids"]  # same ids as one string
    learned = labels != IGNORE_INDEX
    assert np.array_equal(labels[learned], ids[learned])
    assert tok.decode(ids[learned]) == "A penguin on ice.<|im_end|>Black and white.<|im_end|>"
    (a, b), = spans
    assert b - a == 256 * 3 + 2 and tok.decode(ids[a:b]) == image and not learned[a:b].any()


def test_images_expand_in_order_with_their_own_tile_counts(tok):
    conv = [{"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "Same."}]
    ids, _, spans = render_sample(conv, [5, 1], tok, system_prompt=None)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert [b - a for a, b in spans] == [256 * 5 + 2, 256 + 2] and spans[0][1] < spans[1][0]
    assert int((ids == ctx).sum()) == 256 * 6
    assert tok.decode(ids[: spans[0][0]]) == "<|im_start|>user\nCompare "


def test_system_turn_placeholder_rules_and_batch_equivalence(tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    ids, _, _ = render_sample(conv, [], tok)
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    ids, _, spans = render_sample([{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "x"}], [1], tok, None)
    assert tok.decode(ids[: spans[0][0] + 1]) == "<|im_start|>user\n<img>"  # one image, no <image>: goes first
    assert tok.decode(ids[spans[0][1] : spans[0][1] + 3]).startswith("\nDescribe")
    with pytest.raises(ValueError, match="placeholders"):
        render_sample([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], [1], tok)
    with pytest.raises(ValueError, match="role"):
        render_sample([{"from": "robot", "value": "x"}], [], tok)
    convs = [conv, [{"from": "human", "value": "<image>A"}, {"from": "gpt", "value": "B"}]]
    batch = render_batch(convs, [[], [2]], tok)
    for c, t, (ids_, labels_, s) in zip(convs, [[], [2]], batch):
        i1, l1, s1 = render_sample(c, t, tok)
        assert np.array_equal(ids_, i1) and np.array_equal(labels_, l1) and s == s1


text = st.text(alphabet=list("ab cé\n猫12.,!?<>|"), max_size=40)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(text, text), min_size=1, max_size=4))
def test_labels_learn_exactly_the_answers(tok, turns):
    conv = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    ids, labels, _ = render_sample(conv, [], tok, system_prompt="sys")
    assert tok.decode(ids) == chatml("sys", conv)
    learned = labels != IGNORE_INDEX
    assert tok.decode(ids[learned]) == "".join(a + "<|im_end|>" for _, a in turns)
    # learned tokens form exactly one run per answer, each ending at its <|im_end|>
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert int((ids[learned] == im_end).sum()) == len(turns)
