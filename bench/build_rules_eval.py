"""Build the labelled evaluation set for the text rules (issue 15): real paragraphs from installed
Debian packages plus planted defects of every rule's kind, one JSON object per line.

Install the sources first (as root):
    apt-get install -y fortunes fortunes-it fortunes-zh manpages manpages-zh manpages-it manpages-de \
        manpages-fr manpages-es debian-handbook python3.11-doc
then: python bench/build_rules_eval.py --out /tmp/rules-eval/eval.jsonl
A source that is not installed is skipped (the header says which were used).

Real items (label "real"): a paragraph, or a run of consecutive paragraphs of one file up to a
length drawn log-uniformly from 10..600 words, from these sources (licence of each as its package's
/usr/share/doc/<package>/copyright states it):
- fortunes (en; BSD fortune collection, public domain/BSD), fortunes-it (it; GPL-2+), fortunes-zh (zh:
  chinese, tang300, song100; GPL-3+): prose, quotes and poems;
- manpages (en; GPL-2+ and others), manpages-zh (zh; GFDL-1.2+), manpages-it/-de/-fr/-es (GPL-3+):
  documentation, rendered with `man -l` (paragraphs unwrapped; SYNOPSIS and option lists included);
- debian-handbook (26 languages; GPL-2+ or CC-BY-SA-3.0): documentation prose, <p> text;
- python3.11-doc (en; PSF licence): documentation prose (<p>) and code-heavy text (<pre> blocks, kept
  with their line breaks).
Planted items (label = the defect kind): a real item (never one also used as real) damaged in one way
a curation rule is meant to catch; see DEFECTS. Everything is drawn with --seed (default 0).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import html.parser
import json
import math
import os
import random
import re
import signal
import string
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORTUNES = "/usr/share/games/fortunes"
LICENCES = {
    "fortunes": "fortunes (BSD fortune collection): public domain / BSD, /usr/share/doc/fortunes/copyright",
    "fortunes-it": "fortunes-it: GPL-2+, /usr/share/doc/fortunes-it/copyright",
    "fortunes-zh": "fortunes-zh: GPL-3.0+, /usr/share/doc/fortunes-zh/copyright",
    "manpages": "manpages (en): GPL-2+ and others per page, /usr/share/doc/manpages/copyright",
    "manpages-zh": "manpages-zh: GFDL-1.2+, /usr/share/doc/manpages-zh/copyright",
    "manpages-xx": "manpages-it/-de/-fr/-es: GPL-3+, /usr/share/doc/manpages-de/copyright",
    "debian-handbook": "debian-handbook: GPL-2.0+ or CC-BY-SA-3.0, /usr/share/doc/debian-handbook/copyright",
    "python3.11-doc": "python3.11-doc: PSF License 2, /usr/share/doc/python3.11-doc/copyright",
}
HANDBOOK_LANGS = {"en-US": "en", "zh-CN": "zh", "zh-TW": "zh", "ja-JP": "ja", "it-IT": "it", "de-DE": "de",
                  "fr-FR": "fr", "es-ES": "es", "pt-BR": "pt", "nl-NL": "nl", "pl-PL": "pl", "ru-RU": "ru",
                  "ca-ES": "ca", "sv-SE": "sv", "da-DK": "da", "ko-KR": "ko", "vi-VN": "vi"}
MAN_LANGS = {"": "en", "zh_CN": "zh", "it": "it", "de": "de", "fr": "fr", "es": "es"}
CJK_RE = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")  # fortunes-zh colours its attributions: display codes, not text


def unwrap(block: str) -> str:
    if re.search("[\u2500-\u257f]", block) or re.search(r"\S {3,}\S", block):
        return block.strip("\n")  # a table or preformatted block keeps its lines
    lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
    joined = ""
    for ln in lines:  # CJK lines join without a space
        sep = "" if joined and CJK_RE.match(joined[-1]) and CJK_RE.match(ln[0]) else " "
        joined = f"{joined}{sep}{ln}" if joined else ln
    return re.sub(r"[ \t]+", " ", joined)


def paragraphs(text: str) -> list[str]:
    return [p for p in (unwrap(b) for b in re.split(r"\n\s*\n", text)) if p]


# ---------------------------------------------------------------- sources: (source, lang, category, file paragraphs)
def src_fortunes():
    groups = {"fortunes": ("en", ["fortunes", "literature", "science", "wisdom", "people", "politics", "computers"]),
              "fortunes-it": ("it", ["italia", "leggi", "definizioni", "luttazzi", "formiche", "paolotedeschi"]),
              "fortunes-zh": ("zh", ["chinese", "tang300", "song100"])}
    for source, (lang, names) in groups.items():
        for name in names:
            path = os.path.join(FORTUNES, name)
            if not os.path.isfile(path):
                continue
            txt = ANSI_RE.sub("", open(path, encoding="utf-8", errors="replace").read())
            for item in txt.split("\n%\n"):  # one fortune is one document
                if item.strip():
                    yield source, lang, "prose", [item.strip()]


def _render_man(path: str, cache: dict[str, str]) -> str:
    """`man -l` of one page, from `cache` (path -> rendered text, kept next to the output) when there."""
    if path in cache:
        return cache[path]
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    try:  # its own process group: a timeout kills man's troff too (it hung on a zh_CN page, orphaned)
        proc = subprocess.Popen(f"man -l -P cat '{path}' 2>/dev/null | col -bx", shell=True, env=env,
                                stdout=subprocess.PIPE, start_new_session=True)
    except OSError:
        return ""
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return ""
    cache[path] = out.decode("utf-8", "replace")
    return cache[path]


def src_man(rng: random.Random, per_lang: int, cache: dict[str, str]):
    for sub, lang in MAN_LANGS.items():
        files = sorted(f for f in glob.glob(f"/usr/share/man/{sub + '/' if sub else ''}man[1-8]/*")
                       if os.path.isfile(f) and not os.path.islink(f) and not os.path.basename(f).startswith("gcloud"))
        if not files:  # (gcloud's ~16k generated near-identical pages excluded, as ../shared/tools/build_text_corpus.py does)
            continue
        pick = rng.sample(files, min(per_lang, len(files)))
        with ThreadPoolExecutor(2) as ex:
            rendered = list(ex.map(lambda f: _render_man(f, cache), pick))
        source = "manpages" if lang == "en" else f"manpages-{lang}"
        for text in rendered:
            paras = [p for p in paragraphs(text) if not re.match(r"^[A-Z_\-]+\(\d\w*\)", p)]  # page headers
            if paras:
                yield source, lang, "docs", paras


# a page's navigation (Sphinx's sidebar and menu, prev/next bars, footer) is not its text: a nav copy of the
# "previous topic" link made a real page look like duplicated paragraphs
NAV_CLASSES = frozenset(["sphinxsidebar", "related", "footer", "navigation"])


class HTMLText(html.parser.HTMLParser):
    """<p>/<dd>/<li> text as prose paragraphs, <pre> as code blocks (line breaks kept); navigation skipped."""

    def __init__(self):
        super().__init__()
        self.out: list[tuple[str, str]] = []
        self._buf: list[str] | None = None
        self._kind = ""
        self._skip = 0
        self._depth = 0
        self._nav: tuple[str, int] | None = None  # (tag, open count) while inside navigation

    def handle_starttag(self, tag, attrs):
        if self._nav is not None:
            if tag == self._nav[0]:
                self._nav = (tag, self._nav[1] + 1)
            return
        if tag == "nav" or (tag == "div" and NAV_CLASSES & set((dict(attrs).get("class") or "").split())):
            self._nav = (tag, 1)
        elif tag in ("script", "style"):
            self._skip += 1
        elif tag in ("p", "pre") and self._buf is None and "title" not in (dict(attrs).get("class") or ""):
            self._buf, self._kind = [], tag
        elif tag == "div" and self._buf is None and dict(attrs).get("class") == "para":  # DocBook's paragraphs
            self._buf, self._kind, self._depth = [], "div", 0
        elif tag == "div" and self._kind == "div":
            self._depth += 1

    def handle_endtag(self, tag):
        if self._nav is not None:
            if tag == self._nav[0]:
                self._nav = None if self._nav[1] == 1 else (tag, self._nav[1] - 1)
            return
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == "div" and self._kind == "div" and self._depth:
            self._depth -= 1
        elif tag == self._kind and self._buf is not None:  # (a <p class="title"> is a heading: skipped)
            text = "".join(self._buf)
            text = text.strip("\n") if self._kind == "pre" else unwrap(text)
            self._kind = "p" if self._kind == "div" else self._kind
            if text.strip():
                self.out.append((self._kind, text))
            self._buf, self._kind = None, ""

    def handle_data(self, data):
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def _html_parts(path: str) -> list[tuple[str, str]]:
    parser = HTMLText()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    return parser.out


def src_handbook(rng: random.Random, per_lang: int):
    for code, lang in HANDBOOK_LANGS.items():
        files = sorted(glob.glob(f"/usr/share/doc/debian-handbook/html/{code}/*.html"))
        for path in rng.sample(files, min(per_lang, len(files))):
            paras = [t for kind, t in _html_parts(path) if kind == "p"]
            if paras:
                yield "debian-handbook", lang, "docs", paras


def src_python(rng: random.Random, n_files: int):
    files = sorted(glob.glob("/usr/share/doc/python3.11/html/library/*.html"))
    for path in rng.sample(files, min(n_files, len(files))):
        parts = _html_parts(path)
        prose = [t for kind, t in parts if kind == "p"]
        code = [t for kind, t in parts if kind == "pre"]
        if prose:
            yield "python3.11-doc", "en", "docs", prose
        if code:
            yield "python3.11-doc", "en", "code", code


def make_items(paras: list[str], rng: random.Random, code: bool) -> list[str]:
    """Consecutive paragraphs of one file grouped up to a log-uniform word target (10..600)."""
    items, i = [], 0
    while i < len(paras):
        target = math.exp(rng.uniform(math.log(10), math.log(600)))
        group, n = [], 0
        while i < len(paras) and (not group or n + _nwords(paras[i]) <= target):
            group.append(paras[i])
            n += _nwords(paras[i])
            i += 1
        items.append("\n\n".join(group))
    return items


def _nwords(text: str) -> int:
    return len(text.split()) + len(CJK_RE.findall(text))


# ---------------------------------------------------------------- planted defects
def _words(text):
    return text.split()


def d_zero_run(t, rng):
    return t + f" Total: 1{'0' * rng.randint(25, 200)} units."


def d_char_run(t, rng):
    return t + "\n" + rng.choice("!?.a哈xé") * rng.randint(100, 400) + "\n"  # a degenerate generation


def d_long_sentence(t, rng):  # punctuation and line breaks lost: one run-on sentence
    words = re.sub(r"[.!?。！？；\n]", " ", t).split()
    while len(words) < 400:
        words += words
    return " ".join(words[: rng.randint(400, 900)])


def d_symbol_soup(t, rng):  # binary or mojibake dumped into the text
    soup = "".join(rng.choice("@#$%^&*(){}[]<>|\\/~`+=;:'\",.?!¤§¶°±×÷¦¬") for _ in range(rng.randint(400, 1500)))
    return t[: len(t) // 4] + " " + " ".join(soup[i : i + rng.randint(3, 12)] for i in range(0, len(soup), 8))


def d_dup_lines(t, rng):  # a header/footer line repeated between every line
    lines = [ln for ln in t.split("\n") if ln.strip()] or [t]
    boiler = rng.choice(["Click here to subscribe to our newsletter.", "Share this page", "Back to top",
                         "Advertisement", "Copyright (c) all rights reserved."])
    out = []
    for ln in lines * max(1, 6 // len(lines)):
        out += [ln, boiler]
    return "\n".join(out)


def d_dup_paras(t, rng):  # the same paragraph pasted several times
    paras = t.split("\n\n")
    p = rng.choice(paras)
    return "\n\n".join(paras + [p] * rng.randint(3, 6))


def d_ngram_loop(t, rng):  # a generation stuck in a loop
    words = t.split()
    k = rng.randint(4, 12)
    start = rng.randrange(max(1, len(words) - k))
    loop = " ".join(words[start : start + k])
    return " ".join(words[: start + k]) + " " + " ".join([loop] * rng.randint(15, 40))


def d_copied_tail(t, rng):  # half the document pasted again
    words = t.split()
    half = words[len(words) // 2 :]
    return " ".join(words + half)


def d_top_ngram(t, rng):  # keyword spam
    phrase = rng.choice(["buy now", "free download", "best price", "click here", "cheap hotels", "sexy girls"])
    words = t.split()
    out = []
    for w in words:
        out.append(w)
        if rng.random() < 0.5:
            out.append(phrase)
    return " ".join(out)


def d_hashes(t, rng):
    words = t.split()
    return " ".join(w if rng.random() > 0.3 else f"#{w.strip(string.punctuation) or 'tag'}" for w in words)


def d_ellipses(t, rng):
    words = t.split()
    return " ".join(w + ("..." if rng.random() < 0.25 else "") for w in words)


def d_bullets(t, rng):  # a page that is nothing but a list
    words = t.split()
    return "\n".join(f"- {' '.join(words[i : i + rng.randint(3, 7)])}" for i in range(0, len(words), 5))


def d_ellipsis_lines(t, rng):  # teaser lines cut off with "..."
    words = t.split()
    return "\n".join(" ".join(words[i : i + 8]) + "..." for i in range(0, len(words), 12))


def d_numbers(t, rng):  # a table of numbers and symbols with a caption
    cells = [rng.choice([str(rng.randint(0, 99999)), f"{rng.random():.3f}", "|", "-", "+", "%", "$"])
             for _ in range(rng.randint(150, 400))]
    return " ".join(t.split()[:12]) + "\n" + " ".join(cells)


def d_keywords(t, rng):  # keyword stuffing: content words, no function words
    from operators.text_rules import STOP_WORDS

    stops = frozenset().union(*STOP_WORDS.values())
    words = [w.strip(string.punctuation).lower() for w in t.split()]
    words = [w for w in words if len(w) > 2 and w not in stops]
    rng.shuffle(words)
    return " ".join(words)


def d_letter_spaced(t, rng):  # PDF extraction with letter spacing
    return " ".join(" ".join(w) for w in t.split())


def d_glued(t, rng):  # PDF extraction that lost the spaces
    words = t.split()
    return " ".join("".join(words[i : i + rng.randint(3, 6)]) for i in range(0, len(words), 4))


def d_huge(t, rng):  # a dump of > 100,000 words
    words = t.split()
    return " ".join(rng.choice(words) for _ in range(101_000))


DEFECTS = {  # kind -> (generator, the rule meant to catch it, minimum words of the real item used)
    "zero_run": (d_zero_run, "long_zero_run", 1),
    "char_run": (d_char_run, "long_char_run", 1),
    "long_sentence": (d_long_sentence, "long_sentence", 60),
    "symbol_soup": (d_symbol_soup, "symbol_soup", 1),
    "dup_lines": (d_dup_lines, "dup_line_frac", 1),
    "dup_paras": (d_dup_paras, "dup_para_frac", 20),
    "ngram_loop": (d_ngram_loop, "top/dup n-gram", 30),
    "copied_tail": (d_copied_tail, "dup_n_gram", 100),
    "keyword_spam": (d_top_ngram, "top_2_gram", 60),
    "hashtags": (d_hashes, "many_hashes", 60),
    "ellipses": (d_ellipses, "many_ellipses", 60),
    "bullet_list": (d_bullets, "bullet_lines", 60),
    "ellipsis_lines": (d_ellipsis_lines, "ellipsis_lines", 60),
    "number_table": (d_numbers, "few_alpha_words", 12),
    "keyword_stuffing": (d_keywords, "few_stop_words", 100),
    "letter_spaced": (d_letter_spaced, "short_mean_word", 30),
    "glued_words": (d_glued, "long_mean_word", 250),
    "huge_dump": (d_huge, "many_words", 60),
}
LATIN_ONLY = {"keyword_stuffing", "letter_spaced", "glued_words", "ellipses", "hashtags", "bullet_list",
              "ellipsis_lines", "keyword_spam"}  # word-based damage: needs a spaced language


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/rules-eval/eval.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-source", type=int, default=120, help="real items per (source, language)")
    ap.add_argument("--per-defect", type=int, default=40, help="planted items per defect kind (huge_dump: 3)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    cache = os.path.join(os.path.dirname(os.path.abspath(args.out)), "man_cache.json")
    man_cache: dict[str, str] = json.load(open(cache, encoding="utf-8")) if os.path.exists(cache) else {}

    pools: dict[tuple[str, str, str], list[str]] = {}
    gens = [src_fortunes(), src_man(rng, 40, man_cache), src_handbook(rng, 25), src_python(rng, 40)]
    for gen in gens:
        for source, lang, cat, paras in gen:
            items = [x for x in make_items(paras, rng, cat == "code") if len(x.strip()) >= 20]
            pools.setdefault((source, lang, cat), []).extend(items)
    rows, spare = [], []
    for (source, lang, cat), items in sorted(pools.items()):
        rng.shuffle(items)
        items = list(dict.fromkeys(items))  # exact repeats across files would be dedup's business
        take = items[: args.per_source]
        rows += [{"text": t, "label": "real", "source": source, "lang": lang, "category": cat} for t in take]
        spare += [(t, source, lang, cat) for t in items[args.per_source :]]
    rng.shuffle(spare)
    used = 0
    for kind, (make, rule, min_words) in DEFECTS.items():
        want = 3 if kind == "huge_dump" else args.per_defect
        made = 0
        for t, source, lang, cat in spare[used:]:
            used += 1
            if _nwords(t) < min_words or (kind in LATIN_ONLY and CJK_RE.search(t)) or cat == "code":
                continue
            rows.append({"text": make(t, rng), "label": kind, "rule": rule, "source": source, "lang": lang,
                         "category": cat})
            made += 1
            if made == want:
                break
    json.dump(man_cache, open(cache, "w", encoding="utf-8"))
    for i, r in enumerate(rows):
        r["id"] = f"rules-eval/{i}"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    used_sources = sorted({r["source"] for r in rows})
    header = {"header": True, "built_by": "bench/build_rules_eval.py", "seed": args.seed,
              "licences": {s: LICENCES.get(s, LICENCES["manpages-xx"]) for s in used_sources}}
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    real = [r for r in rows if r["label"] == "real"]
    by = {}
    for r in real:
        by[r["lang"]] = by.get(r["lang"], 0) + 1
    print(f"wrote {args.out}: {len(real)} real items ({len(by)} languages: {by}), "
          f"{len(rows) - len(real)} planted defects of {len(DEFECTS)} kinds")


if __name__ == "__main__":
    main()
