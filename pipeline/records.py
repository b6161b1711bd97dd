"""One record of any supported layout -> InternVL turns, image references and the rest as `meta`.

Record layouts (how a sample is spelled; the container, JSONL / JSON array / Parquet / tar, is apart):
- `conversations`: InternVL, LLaVA, LLaVA-OneVision, ShareGPT4V, LLaMA-Factory ShareGPT. Turns are
  `{from: human|gpt|system, value}`; images in `image` (a path or a list) or `images` (a list).
- `messages`: OpenAI / TRL / LLaMA-Factory. Turns are `{role: user|assistant|system, content}` where
  content is a string (with `<image>`) or parts (`{type: text, text}`, `{type: image}` taking the next of
  `images`, `{type: image_url, image_url: {url}}`, `{type: image, image: path}`).
- `cauldron`: HuggingFaceM4/the_cauldron: `images` and `texts: [{user, assistant, source}]`, no
  placeholders (one `<image>` per image goes before the first question).
- `caption`: img2dataset: an image and its caption, which becomes the answer to an instruction.
An image reference is bytes, a `{bytes, path}` struct (HF's Image feature; path-only too), a path, a
`data:` URI, or a remote URI (`s3://`, `gs://`, `https://`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from operators.conversation import IMAGE_PLACEHOLDER, MESSAGE_ROLES, count_placeholders
from pipeline.io import is_uri, join, read_bytes

LAYOUTS = ("conversations", "messages", "cauldron", "caption", "canonical")
IMAGE_PART_TYPES = ("image", "image_url", "input_image")
REMOTE = re.compile(r"^(s3|gs|gcs|https?|hf|az|abfss?|hdfs)://", re.I)
DEFAULT_INSTRUCTION = "Describe the image briefly."


class RecordProblem(Exception):
    """A record that cannot become a sample; `reason` is its `ingest:<reason>`."""

    def __init__(self, reason: str, **detail):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def layout_of(keys) -> str | None:
    """The record layout a dict's keys (or a table's columns) spell, or None."""
    keys = set(keys)
    if {"id", "source", "conversations", "images", "meta"} <= keys:
        return "canonical"
    if "conversations" in keys:
        return "conversations"
    if "messages" in keys:
        return "messages"
    if "texts" in keys:
        return "cauldron"
    return None


def _as_list(v) -> list:
    if v is None or v == "" or v == []:
        return []
    return list(v) if isinstance(v, list | tuple) else [v]


def split_record(rec: dict, layout: str, instruction: str = DEFAULT_INSTRUCTION) -> tuple[list, list, dict]:
    """(raw turns, image references, meta) of one record; raises RecordProblem."""
    if rec.get("video") or rec.get("videos"):  # no video support yet: never turn it into text
        raise RecordProblem("video_unsupported", video=rec.get("video") or rec.get("videos"))
    if layout == "conversations":
        turns = rec.get("conversations")
        refs = _as_list(rec.get("image")) + _as_list(rec.get("images"))
        if isinstance(turns, list) and isinstance(rec.get("system"), str) and rec["system"] \
                and not (turns and isinstance(turns[0], dict) and turns[0].get("from") == "system"):
            turns = [{"from": "system", "value": rec["system"]}, *turns]  # LLaMA-Factory's `system` column
        drop = ("conversations", "image", "images", "system")
    elif layout == "messages":
        turns, refs = messages_to_turns(rec.get("messages"), _as_list(rec.get("images")))
        drop = ("messages", "images")
    elif layout == "cauldron":
        turns, refs = cauldron_to_turns(rec.get("texts"), _as_list(rec.get("images")))
        drop = ("texts", "images")
    elif layout == "caption":
        caption = rec.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise RecordProblem("empty_caption")
        turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{instruction}"}, {"from": "gpt", "value": caption.strip()}]
        refs = _as_list(rec.get("images"))
        drop = ("caption", "images")
    else:
        raise ValueError(f"unknown record layout {layout!r}")
    meta = {k: v for k, v in rec.items() if k not in drop and not isinstance(v, bytes | bytearray)}
    if layout == "cauldron" and isinstance(rec.get("texts"), list):
        meta["text_sources"] = [t.get("source") for t in rec["texts"] if isinstance(t, dict)]
    return turns, refs, meta


def messages_to_turns(messages, images: list) -> tuple[list, list]:
    """OpenAI/TRL messages -> InternVL turns; `{type: image}` parts take `images` in order."""
    if not isinstance(messages, list):
        return messages, images
    turns, refs, pool = [], [], list(images)
    for m in messages:
        if not isinstance(m, dict):
            raise RecordProblem("malformed_conversation")
        role = MESSAGE_ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise RecordProblem("unknown_role", role=str(m.get("role"))[:100])
        content = m.get("content")
        if isinstance(content, str):
            turns.append({"from": role, "value": content})
            continue
        if not isinstance(content, list):
            raise RecordProblem("malformed_conversation")
        pieces = []
        for part in content:
            if not isinstance(part, dict):
                raise RecordProblem("malformed_conversation")
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                continue
            if kind in ("video", "input_video", "video_url"):
                raise RecordProblem("video_unsupported")
            if kind not in IMAGE_PART_TYPES:
                raise RecordProblem("malformed_conversation", part_type=str(kind)[:50])
            ref = part.get("image") or part.get("path") or part.get("url")
            url = part.get("image_url")
            ref = ref or (url.get("url") if isinstance(url, dict) else url)
            if not ref:  # TRL: the part marks where the next of `images` goes
                if not pool:
                    raise RecordProblem("image_count_mismatch")
                ref = pool.pop(0)
            refs.append(ref)
            pieces.append(IMAGE_PLACEHOLDER)
        turns.append({"from": role, "value": "\n".join(pieces)})
    return turns, refs + pool  # left-over images make the count check fail, never vanish


def cauldron_to_turns(texts, images: list) -> tuple[list, list]:
    """the_cauldron's {user, assistant} pairs -> turns, one `<image>` per image before the first question."""
    if not isinstance(texts, list) or not texts:
        raise RecordProblem("empty_conversation")
    turns = []
    for t in texts:
        if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not isinstance(t.get("assistant"), str):
            raise RecordProblem("malformed_conversation")
        turns += [{"from": "human", "value": t["user"]}, {"from": "gpt", "value": t["assistant"]}]
    if images and count_placeholders(turns) == 0:
        turns[0]["value"] = f"{IMAGE_PLACEHOLDER}\n" * len(images) + turns[0]["value"]
    return turns, images


# ---- images ------------------------------------------------------------------------------------

def load_images(refs: list, root: str, remote: bool) -> tuple[list[bytes], list[str]]:
    """Bytes of every reference (exactly as stored) and the paths/URIs read; raises RecordProblem."""
    out, paths = [], []
    for ref in refs:
        if isinstance(ref, dict):  # HF Image feature: {bytes, path}; path-only when bytes is None
            if isinstance(ref.get("bytes"), bytes | bytearray) and ref["bytes"]:
                out.append(bytes(ref["bytes"]))
                continue
            ref = ref.get("path")
        if isinstance(ref, bytes | bytearray):
            out.append(bytes(ref))
            continue
        if not isinstance(ref, str) or not ref:
            raise RecordProblem("bad_image_field", image=repr(ref)[:200], image_paths=paths)
        if ref.startswith("data:"):
            out.append(_data_uri(ref))
            continue
        if REMOTE.match(ref):
            paths.append(ref)
            if not remote:
                raise RecordProblem("remote_image", uri=ref, image_paths=paths)
            out.append(read_remote(ref))
            continue
        full = ref[len("file://"):] if ref.startswith("file://") else ref
        if is_uri(root) and not os.path.isabs(full):  # an annotation on shared storage: its images beside it
            full = join(root, full)
        elif not os.path.isabs(full):
            full = os.path.normpath(os.path.join(root, full))
        paths.append(full)
        try:
            if is_uri(full):
                out.append(read_bytes(full))
            else:
                with open(full, "rb") as f:
                    out.append(f.read())
        except (OSError, ValueError):  # ValueError: a path with a NUL byte
            raise RecordProblem("missing_image", image_paths=paths) from None
    return out, paths


def _data_uri(ref: str) -> bytes:
    head, _, data = ref.partition(",")
    if not head.endswith(";base64"):
        raise RecordProblem("bad_image_field", image=ref[:100])
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RecordProblem("bad_image_field", image=ref[:100]) from None


def read_remote(uri: str) -> bytes:
    """One object through pyarrow.fs (s3, gs, hdfs: credentials and endpoint from the usual variables,
    e.g. AWS_ENDPOINT_URL) or fsspec (https, hf, az); a failure is a missing image naming the URI."""
    try:
        if uri.split("://", 1)[0].lower() in ("s3", "gs", "gcs", "hdfs"):
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(uri)
            with fs.open_input_stream(path) as f:
                return f.read()
        import fsspec

        with fsspec.open(uri, "rb") as f:
            return f.read()
    except Exception as e:  # each backend raises its own kinds (OSError, ClientError, aiohttp errors)
        raise RecordProblem("missing_image", uri=uri, error=str(e).splitlines()[0][:300] if str(e) else "") from None
