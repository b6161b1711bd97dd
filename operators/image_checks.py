"""Multimodal sample checks (issue 3, "Multimodal checks"): `image_checks` looks at the image bytes,
`structure` at the conversation around them.

image_checks: every image decodes (decompression bombs and truncated files are rejected, never
decoded in full), minimum side, maximum aspect ratio, near-blank images (pixel standard deviation of
a small greyscale copy), exact duplicate images within one sample.
structure: `<image>` placeholders == images (InternVL's rule, operators/conversation.py), roles alternate
human/gpt after an optional leading system turn, assistant turns non-empty, over-long samples by a
character budget and, when a tokenizer file is given, a token budget.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import REJECT, REVIEW, Operator, Verdict, register
from operators.conversation import IMAGE_PLACEHOLDER, place_images
from operators.images import MAX_PIXELS, ImageError, decode_draft


def inspect_image(data: bytes, max_pixels: int, thumb: int = 64) -> tuple[int, int, float]:
    """(width, height, pixel std of a greyscale thumbnail); raises operators.images.ImageError for bytes
    that do not decode, are truncated, or have more than `max_pixels` pixels (checked before decoding)."""
    (w, h), img = decode_draft(data, "L", thumb, max_pixels)  # JPEG decodes at 1/2..1/8 scale
    with img:
        grey = img.convert("L")
        grey.thumbnail((thumb, thumb))
    return w, h, float(np.asarray(grey, dtype=np.float32).std())


@register
class ImageChecks(Operator):
    """Decodability, size, aspect ratio, near-blank and duplicate checks on every image of a sample."""

    name = "image_checks"

    class Params(BaseModel):
        """Image thresholds; None switches a check off."""

        model_config = ConfigDict(extra="forbid")
        max_pixels: int = Field(
            MAX_PIXELS, description="images with more pixels are rejected unopened (PIL's bomb limit)"
        )
        min_side: int | None = Field(16, description="shorter side below this many pixels fires")
        max_aspect_ratio: float | None = Field(
            20.0, description="long side / short side above this fires (InternVL tiles up to 12:1 grids)"
        )
        min_pixel_std: float | None = Field(2.0, description="greyscale pixel std below this (0-255) is near-blank")
        reject_duplicates: bool = Field(True, description="the same image bytes twice in one sample fires")
        action: Literal["review", "reject"] = Field(
            "reject", description="what size/aspect/blank/duplicate hits do; undecodable images are always rejected"
        )

    def check_sample(self, images: list[bytes]) -> tuple[str, int, float]:
        """(rule that fires or "", decision, lowest pixel std among the images; 255 when none)."""
        p = self.params
        decision = REJECT if p.action == "reject" else REVIEW
        min_std, soft = 255.0, ""
        for data in images:
            try:
                w, h, std = inspect_image(data, p.max_pixels)
            except ImageError:
                return "undecodable_image", REJECT, 0.0
            min_std = min(min_std, std)
            if soft:
                continue
            if p.min_side is not None and min(w, h) < p.min_side:
                soft = "small_image"
            elif p.max_aspect_ratio is not None and max(w, h) / max(1, min(w, h)) > p.max_aspect_ratio:
                soft = "extreme_aspect_ratio"
            elif p.min_pixel_std is not None and std < p.min_pixel_std:
                soft = "blank_image"
        if not soft and p.reject_duplicates and len(images) > 1:
            digests = [hashlib.blake2b(d, digest_size=16).digest() for d in images]
            if len(set(digests)) < len(digests):
                soft = "duplicate_image"
        return soft, (decision if soft else 0), min_std

    def __call__(self, table: pa.Table) -> Verdict:
        all_images = table.column("images").to_pylist()
        verdict = Verdict.keep_all(len(all_images))
        stds = np.full(len(all_images), 255.0)
        for i, images in enumerate(all_images):
            rule, decision, stds[i] = self.check_sample(images or [])
            if rule:
                verdict.flag(i, rule, decision)
        verdict.columns["score_min_pixel_std"] = stds
        return verdict


@register
class Structure(Operator):
    """Conversation structure: placeholders, role order, empty answers, length budget."""

    name = "structure"

    class Params(BaseModel):
        """Structure rules and the length budget."""

        model_config = ConfigDict(extra="forbid")
        placeholder: Literal["<image>"] = Field(
            IMAGE_PLACEHOLDER, description="InternVL's image placeholder (fixed: operators/conversation.py's rule)"
        )
        max_chars: int | None = Field(
            60_000, description="samples with more text characters than this are over-long"
        )
        max_tokens: int | None = Field(
            None, description="text token budget (needs `tokenizer`); InternVL packs 16384 tokens per row"
        )
        tokenizer: str | None = Field(None, description="path to a tokenizer.json for the token budget")
        long_action: Literal["review", "reject"] = Field("reject", description="what an over-long sample gets")

    def __init__(self, params: Params | None = None, **kwargs):
        super().__init__(params, **kwargs)
        if self.params.max_tokens is not None and not self.params.tokenizer:
            raise ValueError("structure: max_tokens needs a tokenizer (path to tokenizer.json)")
        self._tok = None

    def setup(self) -> None:
        if self.params.tokenizer and self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.params.tokenizer)

    def check_sample(self, turns: list[dict], n_images: int) -> str:
        """The first structural rule the sample breaks, or ""."""
        if not turns:
            return "no_turns"
        roles = [t["from"] for t in turns]
        body = roles[1:] if roles[0] == "system" else roles
        if not body or any(r != ("human" if k % 2 == 0 else "gpt") for k, r in enumerate(body)):
            return "bad_roles"  # must be human, gpt, human, gpt, ... after an optional system turn
        if any(r == "gpt" and not (t["value"] or "").strip() for r, t in zip(roles, turns)):
            return "empty_answer"
        if place_images(turns, n_images)[1]:  # human turns only, one image without `<image>` goes first
            return "placeholder_mismatch"
        return ""

    def __call__(self, table: pa.Table) -> Verdict:
        p = self.params
        convs = table.column("conversations").to_pylist()
        n_images = [len(x or []) for x in table.column("images").to_pylist()]
        verdict = Verdict.keep_all(len(convs))
        n_chars = np.zeros(len(convs))
        long_decision = REJECT if p.long_action == "reject" else REVIEW
        texts = []
        for i, (turns, n_img) in enumerate(zip(convs, n_images)):
            turns = turns or []
            text = "\n".join(t["value"] or "" for t in turns)
            texts.append(text)
            n_chars[i] = len(text)
            rule = self.check_sample(turns, n_img)
            if rule:
                verdict.flag(i, rule, REJECT)
            elif p.max_chars is not None and len(text) > p.max_chars:
                verdict.flag(i, "too_many_chars", long_decision)
        verdict.columns["score_num_chars"] = n_chars
        if p.max_tokens is not None:
            self.setup()
            counts = np.array([len(e.ids) for e in self._tok.encode_batch(texts)], np.float64)
            for i in np.flatnonzero(counts > p.max_tokens):
                verdict.flag(int(i), "too_many_tokens", long_decision)
            verdict.columns["score_num_tokens"] = counts
        return verdict
