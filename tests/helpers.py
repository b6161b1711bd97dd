"""Small builders for test inputs (real images from the bundled sample)."""

from __future__ import annotations

import io
import json
import os
import tarfile


def write_jsonl(path, lines) -> None:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")


def conv(question="<image>\nWhat is this?", answer="A small drawing of a red apple on a white background."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, samples: list[tuple[str, dict, list[bytes], str]]) -> None:
    """samples: (key, json record, images, image extension)."""
    with tarfile.open(path, "w") as tar:
        for key, rec, images, ext in samples:
            add_member(tar, f"{key}.json", json.dumps(rec).encode())
            if len(images) == 1:
                add_member(tar, f"{key}.{ext}", images[0])
            else:
                for i, b in enumerate(images):
                    add_member(tar, f"{key}.{i}.{ext}", b)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tree_bytes(folder) -> dict[str, bytes]:
    """Every file under a folder (relative path -> bytes), to compare two runs byte for byte."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, folder)] = read_bytes(full)
    return out
