"""The transformers processor saved with every HF checkpoint, so `AutoProcessor.from_pretrained(ckpt)` works.

What `InternVLProcessor` needs, as transformers' `convert_internvl_weights_to_hf.py` writes it: a
`GotOcr2ImageProcessor` with `crop_to_patches` (InternVL's dynamic tiling: 448px tiles, 1..12 plus a thumbnail,
ImageNet mean/std as internvl_chat's `build_transform`), `image_seq_length` 256, a tokenizer whose named tokens
are `<img>`, `</img>`, `<IMG_CONTEXT>` (and a video token), and a chat template that puts `<IMG_CONTEXT>\\n`
where an image goes -- the processor expands it to `<img>` + `<IMG_CONTEXT>` x 256*tiles + `</img>`, the same ids
training renders for `<image>\\n` (model.tokenizer.render_sample; tests/test_processor.py checks it).

The files are written directly (`processor_config.json`, `preprocessor_config.json`, tokenizer files,
`chat_template.jinja`) because `InternVLProcessor` itself cannot be built without torchvision (its video
processor is torchvision-only, huggingface/transformers#48558), which this project must not install; a user's
transformers with torchvision reads them as the class would write them.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.tiling import IMAGE_SIZE, TOKENS_PER_TILE
from model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, INTERNVL_SYSTEM_PROMPT

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # internvl_chat/internvl/train/constants.py
IMAGENET_STD = [0.229, 0.224, 0.225]
MAX_TILES = 12  # InternVL 2.5 inference default (max_dynamic_patch)

# ChatML (internvl2_5) with transformers' content lists; InternVL's default system message when none is given.
PROCESSOR_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + INTERNVL_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '" + IMG_CONTEXT + "\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def image_processor(max_patches: int = MAX_TILES):
    """transformers' GotOcr2 image processor doing InternVL's tiling (the PIL variant: no torchvision here)."""
    try:
        from transformers import GotOcr2ImageProcessorPil as cls
    except ImportError:  # transformers 4.x: the slow class is the PIL one
        from transformers import GotOcr2ImageProcessor as cls
    return cls(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def _video_token(vocab: dict) -> str:
    """A video token already in the vocabulary (the model's embedding has no room for a new one); checkpoints
    trained here take images only, so without one the image token stands in and videos are not supported."""
    return next((t for t in ("<video>", "<|video_pad|>") if t in vocab), IMG_CONTEXT)


def processor_tokenizer(path_or_tokenizer):
    """The checkpoint's tokenizer with InternVLProcessor's named tokens and the processor's chat template."""
    from transformers import AutoTokenizer

    src = path_or_tokenizer
    if not isinstance(src, str | Path):
        src = src.name_or_path
    tok = AutoTokenizer.from_pretrained(str(src))
    n_vocab = len(tok)
    named = {"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT,
             "video_token": _video_token(tok.get_vocab())}
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in tok.get_vocab()]
    if missing:
        raise ValueError(f"tokenizer at {src} lacks {missing}: load it with model.tokenizer.load_tokenizer")
    tok = AutoTokenizer.from_pretrained(str(src), extra_special_tokens=named)
    if len(tok) != n_vocab:
        raise ValueError(f"naming the image tokens grew the vocabulary {n_vocab} -> {len(tok)}")
    tok.chat_template = PROCESSOR_CHAT_TEMPLATE
    return tok


def save_processor(path: str | Path, tokenizer=None, max_patches: int = MAX_TILES) -> None:
    """Write the InternVL processor files into checkpoint dir `path` (its tokenizer files are rewritten with
    the named image tokens; the vocabulary does not change)."""
    path = Path(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    tok = processor_tokenizer(path)
    tok.save_pretrained(str(path))
    ip = image_processor(max_patches)
    ip.save_pretrained(str(path))
    ip_dict = ip.to_dict()
    # the torchvision-backed class when the reader has torchvision, else transformers falls back to the PIL one
    ip_dict["image_processor_type"] = "GotOcr2ImageProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(ip_dict, indent=2, sort_keys=True) + "\n")
    proc = {"image_processor": ip_dict, "image_seq_length": TOKENS_PER_TILE, "processor_class": "InternVLProcessor"}
    (path / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")
    (path / "chat_template.jinja").write_text(PROCESSOR_CHAT_TEMPLATE)
