"""A JSON array file (LLaVA's `llava_v1_5_mix665k.json`, ShareGPT4V) read one element at a time.

`element_spans` scans the file once in 1 MiB chunks and returns the byte span of every top-level
element, without building any element: a regex skips whole strings (so brackets inside text never
count) and tracks only bracket depth and top-level commas. Memory is one chunk plus two ints per
element (665k records: ~10 MB), never the parsed array (~10x the file in Python objects). The spans
are the array's length counted apart from the parser, and let a worker `json.loads` exactly one
element per span, so one broken element is one rejected row, not the rest of the file.
"""

from __future__ import annotations

import io
import re

from pipeline.io import is_uri, open_input

CHUNK = 1 << 20
BOM = b"\xef\xbb\xbf"
# a whole string | an unterminated string (cut by the chunk end: rescan from it) | a structural byte
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|"|[\[\]{},]', re.S)
_WS = b" \t\r\n"


def open_binary(path: str):
    """A seekable binary file with readline, for a local path or any URI pipeline/io.py resolves."""
    return open(path, "rb") if not is_uri(path) else io.BufferedReader(open_input(path), CHUNK)


class NotAnArray(ValueError):
    """The file's first non-blank byte is not `[`."""


def element_spans(path: str, chunk: int = CHUNK, stop_after: int | None = None) -> list[tuple[int, int]]:
    """[(start, end)) byte spans of the top-level elements of the JSON array in `path`.

    A truncated file yields its complete elements plus one span for the unfinished rest (which then
    fails to parse and is rejected with its text): nothing after the last comma is dropped.
    `stop_after`: return after that many elements (a peek at the first one)."""
    spans: list[tuple[int, int]] = []
    with open_binary(path) as f:
        head = f.read(len(BOM))
        base = len(BOM) if head == BOM else 0
        f.seek(base)
        buf, pos = b"", base  # buf holds file bytes from offset pos
        depth, start, opened = 0, None, False
        eof = False
        while True:
            data = f.read(chunk)
            if not data:
                eof = True
            buf += data
            i = 0
            while True:
                m = _TOKENS.search(buf, i)
                if m is None:
                    i = len(buf)
                    break
                tok = m.group()
                if tok == b'"' and not eof:  # a string cut by the chunk end: read more and rescan it
                    i = m.start()
                    break
                if not opened:
                    lead = buf[i:m.start()].strip(_WS)
                    if tok != b"[" or lead:
                        raise NotAnArray(f"{path}: not a JSON array (starts with {(lead or tok)[:20]!r})")
                    opened, depth, start = True, 1, pos + m.end()
                elif tok in (b"[", b"{"):
                    depth += 1
                elif tok in (b"]", b"}"):
                    depth -= 1
                    if depth == 0:  # the array's closing bracket
                        _close(spans, path, start, pos + m.start())
                        return spans
                elif tok == b"," and depth == 1:
                    spans.append((start, pos + m.start()))
                    start = pos + m.end()
                    if stop_after is not None and len(spans) >= stop_after:
                        return spans
                i = m.end()
            if eof:
                break
            buf, pos = buf[i:], pos + i
        if not opened:
            raise NotAnArray(f"{path}: not a JSON array (empty file)")
        _close(spans, path, start, pos + len(buf))
    return spans


def _close(spans: list, path: str, start: int, end: int) -> None:
    """Add the last element unless it is only blanks (`[]`, or a trailing comma before `]`)."""
    with open_binary(path) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            part = f.read(min(left, CHUNK))
            if not part:
                return
            if part.strip(_WS):
                spans.append((start, end))
                return
            left -= len(part)


def read_span(f, span: tuple[int, int]) -> bytes:
    f.seek(span[0])
    return f.read(span[1] - span[0])
