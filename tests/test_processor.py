"""Checkpoints a transformers user can run: the InternVL processor files saved with every HF checkpoint.

On a real image from data/sample: transformers' GotOcr2 image processor read back from the checkpoint gives the
pixels training makes (model.tiling + ImageNet normalisation), the checkpoint's tokenizer and chat template give
the ids training renders, and `generate` runs.

`AutoProcessor.from_pretrained` itself cannot run without torchvision in any transformers release up to 5.24
(the newest): `InternVLProcessor` type-checks its `video_processor` against `BaseVideoProcessor`, which requires
torchvision, and `AutoProcessor` always loads that video processor (huggingface/transformers#48558), so even
the OpenGVLab `-hf` checkpoints fail the same way here. This project must not install torchvision, so that one
test runs where torchvision is present; `test_transformers_user_runs_the_checkpoint_on_a_real_image` runs every
piece it is made of.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, InternVLForConditionalGeneration

from model.build import from_preset
from model.processor import save_processor
from model.tiling import dynamic_preprocess
from model.tokenizer import render_sample

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "data/sample/images/symbols/money/canadian/coins/200toonie.png"  # Tux Paint stamp, GPL-2
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def checkpoint(train_tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    from_preset("tiny", train_tok).save_pretrained(str(path))
    save_processor(path, train_tok)
    return path


def expand(text: str, tok, num_patches: int) -> str:
    """InternVLProcessor.replace_image_token: <img> + <IMG_CONTEXT> x 256*tiles + </img> for each image token."""
    block = tok.start_image_token + tok.context_image_token * 256 * num_patches + tok.end_image_token
    return text.replace(tok.context_image_token, block, 1)


def test_saved_processor_files(checkpoint, train_tok):
    proc = json.loads((checkpoint / "processor_config.json").read_text())
    assert proc["processor_class"] == "InternVLProcessor" and proc["image_seq_length"] == 256
    ip = proc["image_processor"]
    assert ip["crop_to_patches"] and (ip["min_patches"], ip["max_patches"]) == (1, 12)
    assert ip["image_mean"] == [0.485, 0.456, 0.406] and ip["image_std"] == [0.229, 0.224, 0.225]
    assert ip["size"] == {"height": 448, "width": 448}
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    assert len(tok) == len(train_tok)  # the vocabulary the model was trained with, unchanged
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert tok.context_image_token_id == train_tok.convert_tokens_to_ids("<IMG_CONTEXT>")


@pytest.mark.slow
def test_transformers_user_runs_the_checkpoint_on_a_real_image(checkpoint, train_tok):
    from train.data import normalize  # the pixels training feeds the model

    image = Image.open(IMAGE).convert("RGB")
    ip = AutoImageProcessor.from_pretrained(str(checkpoint))
    px = ip(images=[image], return_tensors="pt")
    n = int(px["num_patches"][0])
    tiles = dynamic_preprocess(image)
    assert n == len(tiles) and px["pixel_values"].shape == (n, 3, 448, 448)
    ours = torch.from_numpy(np.stack([normalize(t) for t in tiles]))
    torch.testing.assert_close(px["pixel_values"], ours, atol=1e-5, rtol=0)

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    text = expand(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True), tok, n)
    inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    trained, _, _ = render_sample(
        [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "x"}], [n], train_tok
    )
    prompt = inputs["input_ids"][0].tolist()
    assert prompt == trained[: len(prompt)].tolist()  # the prompt training renders, up to the answer
    assert train_tok.decode(trained[len(prompt) - 3 : len(prompt)]).endswith("assistant\n")

    model = InternVLForConditionalGeneration.from_pretrained(str(checkpoint))
    out = model.generate(**inputs, pixel_values=px["pixel_values"], max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_auto_processor_generate(checkpoint):
    import importlib.util

    from transformers import AutoProcessor

    if importlib.util.find_spec("torchvision") is None:
        # the upstream limit the module docstring names; once a transformers release lifts it this fails, and the
        # generate check below can run without torchvision
        with pytest.raises(ValueError, match="torchvision"):
            AutoProcessor.from_pretrained(str(checkpoint))
        pytest.skip("InternVLProcessor needs torchvision (huggingface/transformers#48558)")

    processor = AutoProcessor.from_pretrained(str(checkpoint))
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "url": str(IMAGE)}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    model = InternVLForConditionalGeneration.from_pretrained(str(checkpoint))
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
