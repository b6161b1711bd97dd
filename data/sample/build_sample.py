#!/usr/bin/env python3
"""Rebuild the bundled sample from Debian packages (run as root after
`apt-get install tuxpaint-stamps-default fortunes fortunes-zh`). The output is committed; tests and the
demo never run this. Writes meta.json, *.jsonl and images/ here; SOURCES.md says where each came from."""

import json
import os
import random
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAMPS = Path("/usr/share/tuxpaint/stamps")
FORTUNES = Path("/usr/share/games/fortunes")
rng = random.Random(0)


def stamps():
    out = []
    for txt in sorted(STAMPS.rglob("*.txt")):
        png = txt.with_suffix(".png")
        lines = txt.read_text(errors="replace").splitlines()
        zh = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("zh_CN.utf8=")), "")
        if png.exists() and lines and lines[0].strip() and zh and png.stat().st_size < 60_000:
            out.append((png, lines[0].strip(), zh.strip()))
    return out


def copy(png: Path) -> str:
    rel = Path("images") / png.relative_to(STAMPS)
    (HERE / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, HERE / rel)
    return str(rel.relative_to("images"))


def fortunes(name, n, max_len=600):
    text = re.sub(r"\x1b\[[0-9;]*m", "", (FORTUNES / name).read_text(errors="replace"))
    items = [t.strip() for t in text.split("\n%\n") if 40 < len(t.strip()) < max_len]
    return rng.sample(items, n)


def write(name, rows):
    with open(HERE / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    shutil.rmtree(HERE / "images", ignore_errors=True)
    pool = stamps()
    rng.shuffle(pool)
    en, zh, multi = pool[:40], pool[40:55], pool[55:79]
    asks = ["Describe this picture.", "What does this image show?", "Write a short caption for this drawing."]
    write("tuxpaint_caption", [
        {"id": i, "image": copy(p), "conversations": [
            {"from": "human", "value": f"<image>\n{rng.choice(asks)}"}, {"from": "gpt", "value": cap}]}
        for i, (p, cap, _) in enumerate(en)])
    write("tuxpaint_caption_zh", [
        {"id": i, "image": copy(p), "conversations": [
            {"from": "human", "value": "<image>\n请用一句话描述这张图片。"}, {"from": "gpt", "value": cap_zh}]}
        for i, (p, _, cap_zh) in enumerate(zh)])
    rows = []
    for i in range(0, len(multi), 3):
        group = multi[i:i + 3] if i % 2 == 0 else multi[i:i + 2]
        if len(group) < 2:
            continue
        listing = " ".join(f"Picture {k + 1}: {cap}" for k, (_, cap, _) in enumerate(group))
        rows.append({"id": len(rows), "image": [copy(p) for p, _, _ in group], "conversations": [
            {"from": "human", "value": "".join(f"Picture {k + 1}: <image>\n" for k in range(len(group)))
             + "What does each picture show?"}, {"from": "gpt", "value": listing}]})
    write("tuxpaint_compare", rows)
    topics = ["science", "computers", "literature", "wisdom", "linux"]
    write("fortunes_text", [
        {"id": i, "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": f"Share a saying about {t}."}, {"from": "gpt", "value": q}]}
        for i, (t, q) in enumerate((t, q) for t in topics for q in fortunes(t, 5))])
    poems = fortunes("tang300", 12, 400)
    write("tang_poems", [
        {"id": i, "conversations": [
            {"from": "human", "value": f"请默写{p.splitlines()[0]}。"}, {"from": "gpt", "value": "\n".join(p.splitlines()[1:])}]}
        for i, p in enumerate(poems)])
    # messy: what real annotation files contain; every line must land in rejected/ with a reason
    bad_png = HERE / "images" / "broken.png"
    bad_png.write_bytes((HERE / "images" / copy(en[0][0])).read_bytes()[:300])  # truncated PNG
    good = copy(en[1][0])
    with open(HERE / "messy.jsonl", "w") as f:
        f.write(json.dumps({"id": 0, "image": good, "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": en[1][1]}]}) + "\n")
        f.write('{"id": 1, "image": "' + good + '", "conversations": [{"from": "human", "value": "<ima\n')
        f.write(json.dumps({"id": 2, "image": "no/such/file.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]}) + "\n")
        f.write(json.dumps({"id": 3, "image": "broken.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]}) + "\n")
        f.write(json.dumps({"id": 4, "image": [good, good], "conversations": [
            {"from": "human", "value": "<image>\nCompare."}, {"from": "gpt", "value": "They are the same."}]}) + "\n")
        f.write(json.dumps({"id": 5, "conversations": []}) + "\n")
        f.write(json.dumps({"id": 6, "conversations": [
            {"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]}) + "\n")
        f.write(json.dumps({"id": 7, "conversations": [{"from": "human", "value": "Anyone there?"}]}) + "\n")
    meta = {
        "tuxpaint_caption": {"root": "images", "annotation": "tuxpaint_caption.jsonl", "data_augment": True,
                             "max_dynamic_patch": 12, "repeat_time": 1, "category": "captioning", "length": len(en)},
        "tuxpaint_caption_zh": {"root": "images", "annotation": "tuxpaint_caption_zh.jsonl", "data_augment": True,
                                "repeat_time": 2, "category": "captioning", "length": len(zh)},
        "tuxpaint_compare": {"root": "images", "annotation": "tuxpaint_compare.jsonl", "data_augment": True,
                             "max_dynamic_patch": 6, "repeat_time": 1, "category": "general", "length": len(rows)},
        "fortunes_text": {"root": "", "annotation": "fortunes_text.jsonl", "repeat_time": 1, "category": "general",
                          "length": 25},
        "tang_poems": {"root": "", "annotation": "tang_poems.jsonl", "repeat_time": 0.5, "category": "general",
                       "length": 12},
        "messy": {"root": "images", "annotation": "messy.jsonl", "data_augment": True, "repeat_time": 1,
                  "category": "captioning", "length": 8},
    }
    (HERE / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
