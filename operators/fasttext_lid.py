"""fastText's top-1 prediction (`model.predict(lines, k=1)`) for hierarchical-softmax classifiers such as
`lid.176.ftz`, recomputed with numpy: the same labels and the same float32 probabilities, bit for bit.

Why: in fastText every token costs a subword pass (`Dictionary::computeSubwords`) and one hash-map lookup
per character n-gram (`pushHash` through the pruned model's index: half of all predict time under perf).
Here each distinct word's row ids are computed once and kept on the object, so a token costs a dict lookup.
Every float operation follows fastText's C++ (src/dictionary.cc, src/loss.cc, src/quantmatrix.cc of
facebookresearch/fastText v0.9.2) in the same order and precision; `expf` and `log` come from numpy in
float64, and the rare value that lies too close to a float32 rounding boundary to be sure of is recomputed
by the C library fastText itself calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import struct

import numpy as np

EOS = "</s>"
_SEPARATORS = str.maketrans({c: " " for c in "\t\r\v\f\0"})  # fastText's readWord splits on these and ' '
_CHUNK_IDS = 1 << 18  # row ids gathered at once (x 64 bytes of float32 rows)


def _libm():
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    lib.expf.restype, lib.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    lib.log.restype, lib.log.argtypes = ctypes.c_double, [ctypes.c_double]
    return lib


def _to_f32_exactly(y: np.ndarray, libm_fn, x: np.ndarray, margin_bits: int) -> np.ndarray:
    """float32(y), where y = fn(x) in float64; where y lies within 2**margin_bits float64 units of a float32
    rounding midpoint (or is no normal float32), the C library's own function (what fastText gets)."""
    shape, y, x = y.shape, y.ravel(), x.ravel()
    with np.errstate(over="ignore", invalid="ignore"):  # exp overflows to inf in C as here
        r = y.astype(np.float32)
        low = (y.view(np.uint64) & np.uint64((1 << 29) - 1)).astype(np.int64)  # the 29 bits float32 drops
        near = np.abs(low - (1 << 28)) <= (1 << margin_bits)
        a = np.abs(y)
        near |= ~((a >= 2.0**-125) & (a < 2.0**127))  # zero, subnormal, huge or inf: not worth the care
    for i in np.flatnonzero(near):
        r[i] = libm_fn(float(x[i]))
    return r.reshape(shape)


def read_model(path: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """(pruneidx_size, buckets, rows, input matrix) from a saved model (FastText::saveModel): the pruned
    buckets from its dictionary (Dictionary::save; size -1 = not pruned), then its input matrix when it
    is product-quantized without norms (QuantMatrix::save), else None."""
    with open(path, "rb") as f:
        f.seek(8 + 12 * 4 + 8)  # magic + version, Args::save's 12 ints and one double
        size, _nwords, _nlabels = struct.unpack("<3i", f.read(12))
        _ntokens, prune_size = struct.unpack("<2q", f.read(16))
        data = f.read()
    pos = 0
    for _ in range(size):  # entries: word bytes, '\0', int64 count, int8 type
        pos = data.index(b"\0", pos) + 1 + 9
    pairs = np.frombuffer(data, "<i4", count=2 * max(prune_size, 0), offset=pos).reshape(-1, 2)
    pos += pairs.nbytes
    return prune_size, pairs[:, 0].copy(), pairs[:, 1].copy(), _quantized_rows(data, pos)


def _quantized_rows(data: bytes, pos: int) -> np.ndarray | None:
    """The rows of a product-quantized input matrix, as Vector::addRow(QuantMatrix) gives them
    (ProductQuantizer::addcode on a zero vector: each subvector is its centroid times the row's norm, one
    float32 product; norm 1 without qnorm), or None for a dense matrix. QuantMatrix::save writes
    quant_input, qnorm (bools), m, n (int64), codesize (int32), the codes (uint8, nsubq per row), the
    quantizer (dim, nsubq, dsub, lastdsub as int32, then float32 centroids, ksub = 256 per
    subquantizer, the last one's lastdsub long), and with qnorm one uint8 norm code per row and the
    norms' own one-dimensional quantizer."""
    quant, qnorm = data[pos], data[pos + 1]
    if not quant:
        return None
    m, n, codesize = struct.unpack_from("<2qi", data, pos + 2)
    codes, pos = np.frombuffer(data, np.uint8, codesize, pos + 22), pos + 22 + codesize
    (dim, nsubq, dsub, lastdsub), centroids, pos = _quantizer(data, pos)
    if dim != n or codesize != m * nsubq:
        return None
    codes = codes.reshape(m, nsubq).astype(np.int64)
    rows = np.empty((m, n), np.float32)
    for q in range(nsubq):  # ProductQuantizer::get_centroids(q, code)
        d = lastdsub if q == nsubq - 1 else dsub
        rows[:, q * dsub : q * dsub + d] = centroids[(q * 256 * dsub + codes[:, q] * d)[:, None] + np.arange(d)]
    if qnorm:
        norm_codes = np.frombuffer(data, np.uint8, m, pos)
        _, norms, _ = _quantizer(data, pos + m)
        rows *= norms[norm_codes][:, None]  # addcode's alpha * c[j], in float32
    return rows


def _quantizer(data: bytes, pos: int) -> tuple[tuple[int, ...], np.ndarray, int]:
    """ProductQuantizer::load at `pos`: (dim, nsubq, dsub, lastdsub), the centroids, the position after."""
    head = struct.unpack_from("<4i", data, pos)
    centroids = np.frombuffer(data, "<f4", head[0] * 256, pos + 16)
    return head, centroids, pos + 16 + centroids.nbytes


class HsTop1:
    """`model.predict(lines, k=1)` of a supervised hierarchical-softmax fastText model, recomputed.

    `supported(model)` says whether a model is one this reproduces (hs loss, no word n-grams, input
    not norm-quantized, output not quantized); callers use fastText's own predict otherwise."""

    def __init__(self, model, path: str, max_words: int = 300_000):
        a = model.f.getArgs()
        self.minn, self.maxn, self.bucket = a.minn, a.maxn, a.bucket
        words = model.get_words()
        self.nwords = len(words)
        self.vocab = {w: i for i, w in enumerate(words)}
        self.prune_size, buckets, prune_rows, quantized = read_model(path)
        if self.prune_size > 0:
            self.prune = np.full(self.bucket, -1, np.int32)
            self.prune[buckets] = prune_rows
        nrows = self.nwords + (self.prune_size if self.prune_size >= 0 else self.bucket)
        if quantized is not None and len(quantized) == nrows:  # (50,000 get_input_vector calls: 0.17 s)
            self.rows = quantized
        elif model.is_quantized():
            self.rows = np.stack([model.get_input_vector(i) for i in range(nrows)]).astype(np.float32)
        else:
            self.rows = np.asarray(model.get_input_matrix(), np.float32)
        labels, counts = model.get_labels(include_freq=True)
        self.labels = [lab.removeprefix("__label__") for lab in labels]
        osz = len(labels)
        self.osz = osz
        self.out = np.asarray(model.f.getOutputMatrix(), np.float32)[: osz - 1]
        self.left, self.right = _build_tree([int(c) for c in counts])
        self.preorder = _preorder(self.left, self.right, 2 * osz - 2)
        self.libm = _libm()
        self.threshold = np.float32(np.log(1e-5))  # std_log(0.0): fastText's default threshold
        self.max_words = max_words
        self.slot = _Slots()  # word -> its row ids' place in the flat buffer (a per-object cache)
        self.starts = np.zeros(0, np.int64)
        self.lens = np.zeros(0, np.int64)
        self.buf = np.zeros(0, np.int32)  # row ids of every cached word, back to back

    @staticmethod
    def supported(model) -> bool:
        a = model.f.getArgs()
        q = model.is_quantized()
        return (a.model.name == "supervised" and a.loss.name == "hs" and a.wordNgrams == 1
                and 2 <= a.minn <= a.maxn and not (q and (a.qnorm or a.qout)))

    # ---------------------------------------------------------------- tokens -> row ids
    @staticmethod
    def line_words(line: str) -> list[str]:
        """Dictionary::readWord's words of one line: split on ' ', '\\t', '\\r', '\\v', '\\f' and '\\0'."""
        if line.isprintable():  # then ' ' is its only whitespace, for Python's split as for fastText's
            return line.split()
        return [t for t in line.translate(_SEPARATORS).split(" ") if t]

    @staticmethod
    def _get_line(words: list[str], line: str) -> list[str]:
        """Dictionary::getLine's tokens of `words` (those of `line`) + '\\n': up to the first EOS, which
        ends them; labels dropped. `words` is extended in place."""
        if EOS in line and EOS in words:  # a substring test on the line first: no word has one it lacks
            del words[words.index(EOS) :]
        words.append(EOS)
        return [t for t in words if not t.startswith("__label__")] if "__label__" in line else words

    def _add_words(self, new: list[str]) -> None:
        """Row ids of the words just given slots, as Dictionary::getSubwords computes them, to the buffer."""
        ids, lens = self._subword_ids(new)
        self.starts = np.concatenate([self.starts, len(self.buf) + np.cumsum(lens) - lens])
        self.lens = np.concatenate([self.lens, lens])
        self.buf = np.concatenate([self.buf, ids])

    def _subword_ids(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The row ids of all `words` (at least one) in order and how many each has. Per word: its word id when in
        the vocabulary, then the rows of its character n-grams (computeSubwords: n-grams of minn..maxn UTF-8
        characters of '<word>' by start then length, FNV-1a over signed bytes, modulo bucket, pushHash)."""
        data = np.frombuffer(("<" + "><".join(words) + ">").encode("utf-8"), np.uint8)  # '<word>' back to back
        cpos = np.flatnonzero((data & 0xC0) != 0x80)  # byte position of every character
        nc = len(cpos)
        clen = np.diff(np.append(cpos, len(data)))  # words lie back to back: a character ends where the next starts
        nchar = np.fromiter(map(len, words), np.int64, len(words)) + 2  # one UTF-8 lead byte per code point
        cword = np.repeat(np.arange(len(words)), nchar)
        left = np.repeat(np.cumsum(nchar), nchar) - np.arange(nc)  # characters to the word's end
        signed = data.astype(np.int8).astype(np.uint32)  # uint32(int8(c)): bytes >= 0x80 sign-extend
        multibyte = [np.flatnonzero(clen > t) for t in range(1, 4)]
        prime = np.uint32(16777619)

        def extend(h: np.ndarray, off: int) -> None:
            """h[g] continues over the bytes of character g + off (FNV-1a is one byte after another)."""
            hh = h[: nc - off]
            hh ^= signed[cpos[off:]]
            hh *= prime
            for t, idx in enumerate(multibyte, start=1):
                g = idx[idx >= off] - off
                hh[g] = (hh[g] ^ signed[cpos[g + off] + t]) * prime

        h = np.full(nc, 2166136261, np.uint32)
        extend(h, 0)
        wid = np.fromiter(map(self.vocab.get, words, itertools.repeat(-1)), np.int32, len(words))
        table = np.empty((nc, 2 + self.maxn - self.minn), np.int32)  # per character: word id, then n-grams
        table[:, 0] = np.where(left == nchar[cword], wid[cword], -1)
        not_eos = cword != (words.index(EOS) if EOS in words else -1)  # EOS has no subwords
        for n in range(2, self.maxn + 1):
            extend(h, n - 1)
            if n < self.minn:
                continue
            gid = (h % np.uint32(self.bucket)).astype(np.int32)
            if self.prune_size > 0:
                gid = self.prune[gid]
            elif self.prune_size == 0:
                gid[:] = -1
            ok = (left >= n) & (gid >= 0) & not_eos
            table[:, 1 + n - self.minn] = np.where(ok, gid + self.nwords, -1)
        keep = table >= 0
        return table[keep], np.add.reduceat(keep.ravel(), (np.cumsum(nchar) - nchar) * table.shape[1], dtype=np.int64)

    # ---------------------------------------------------------------- hidden vectors, then the tree
    def hidden(self, words: list[list[str]], lines: list[str]) -> np.ndarray:
        """Model::computeHidden per line (its words, changed in place, and the line or any text holding
        them): the row average, in fastText's order (float32)."""
        if len(self.slot) > self.max_words:
            self.slot.clear()
            self.starts, self.lens, self.buf = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
        toks = [self._get_line(ws, line) for ws, line in zip(words, lines)]
        self.slot.new = []
        ks = np.fromiter(map(self.slot.__getitem__, itertools.chain.from_iterable(toks)), np.int64)
        if self.slot.new:
            self._add_words(self.slot.new)
        ntok = np.array([len(t) for t in toks], np.int64)
        tok_lens = self.lens[ks]
        per_line = np.add.reduceat(tok_lens, np.cumsum(ntok) - ntok)  # every line has EOS at least
        if not per_line.all():
            raise ValueError("fastText returns no label for a line without any known row")
        tok_end = np.cumsum(ntok)
        row_end = np.cumsum(per_line)
        out = np.empty((len(toks), self.rows.shape[1]), np.float32)
        i = 0
        while i < len(toks):  # lines i..j-1 together, about _CHUNK_IDS rows
            j = max(i + 1, int(np.searchsorted(row_end, row_end[i] - per_line[i] + _CHUNK_IDS)))
            t0, t1 = tok_end[i] - ntok[i], tok_end[j - 1]
            lens, starts = tok_lens[t0:t1], self.starts[ks[t0:t1]]
            offs = np.cumsum(lens) - lens
            rows = self.rows[self.buf[np.repeat(starts - offs, lens) + np.arange(int(lens.sum()))]]
            ends = row_end[i:j] - (row_end[i] - per_line[i])
            # add.reduce over axis 0 adds the rows one after another, as averageRowsToVector does
            # (add.reduceat does not: it gives other float32 sums)
            out[i:j] = np.stack([np.add.reduce(rows[b - c : b], axis=0) for b, c in zip(ends, per_line[i:j])])
            i = j
        return out * (1.0 / per_line).astype(np.float32)[:, None]

    def _expf(self, x: np.ndarray) -> np.ndarray:
        return _to_f32_exactly(np.exp(x.astype(np.float64)), self.libm.expf, x, 23)  # glibc: 2**-34 relative

    def _std_log(self, x: np.ndarray) -> np.ndarray:
        """loss.cc std_log(real x) = log(x + 1e-5) in double, returned as float."""
        y = x.astype(np.float64) + 1e-5
        return _to_f32_exactly(np.log(y), self.libm.log, y, 4)  # double log: within an ulp or two

    def predict(self, lines: list[str]) -> tuple[list[str], np.ndarray]:
        """Per line the top label (without __label__) and its float32 probability, as fastText gives."""
        return self.predict_words([self.line_words(line) for line in lines], lines)

    def predict_words(self, words: list[list[str]], texts: list[str]) -> tuple[list[str], np.ndarray]:
        """predict() of lines given as their words (line_words; the lists are changed) and for each a text
        that holds them (the line, or the text it was made from)."""
        n = len(words)
        if n == 0:
            return [], np.zeros(0, np.float32)
        hid = self.hidden(words, texts)
        osz = self.osz
        dot = np.zeros((n, osz - 1), np.float32)
        for j in range(hid.shape[1]):  # DenseMatrix::dotRow: d += w[j] * h[j], in order, in float32
            dot += hid[:, j : j + 1] * self.out[:, j]
        f = (1.0 / (np.float32(1) + self._expf(-dot)).astype(np.float64)).astype(np.float32)
        lterm = self._std_log((1.0 - f.astype(np.float64)).astype(np.float32))
        rterm = self._std_log(f)
        score = np.zeros((2 * osz - 1, n), np.float32)
        for node in range(2 * osz - 2, osz - 1, -1):  # parents have higher indices than children
            score[self.left[node]] = score[node] + lterm[:, node - osz]
            score[self.right[node]] = score[node] + rterm[:, node - osz]
        # HierarchicalSoftmaxLoss::dfs with k=1: preorder, a node is cut when below the threshold or the
        # best leaf so far; a leaf that is reached replaces the best (ties: the later leaf)
        visited = np.zeros((2 * osz - 1, n), bool)
        best = np.full(n, -np.inf, np.float32)
        have = np.zeros(n, bool)
        label = np.full(n, -1, np.int64)
        for node, parent in self.preorder:
            s = score[node]
            v = (visited[parent] if parent >= 0 else np.ones(n, bool)) & (s >= self.threshold)
            v &= ~(have & (s < best))
            visited[node] = v
            if node < osz:
                best[v], label[v] = s[v], node
                have |= v
        if not have.all():
            raise ValueError("fastText returns no label for a line here (every leaf under the threshold)")
        prob = self._expf(best)
        return [self.labels[i] for i in label], prob


class _Slots(dict):
    """word -> slot number; an unseen word gets the next number and is listed in `new`."""

    def __init__(self):
        super().__init__()
        self.new: list[str] = []

    def __missing__(self, word: str) -> int:
        self[word] = n = len(self)
        self.new.append(word)
        return n


def _build_tree(counts: list[int]) -> tuple[list[int], list[int]]:
    """HierarchicalSoftmaxLoss::buildTree: Huffman tree over the label counts (sorted, most frequent first)."""
    osz = len(counts)
    count = counts + [10**15] * (osz - 1)
    left, right = [-1] * (2 * osz - 1), [-1] * (2 * osz - 1)
    leaf, node = osz - 1, osz
    for i in range(osz, 2 * osz - 1):
        mini = []
        for _ in range(2):
            if leaf >= 0 and count[leaf] < count[node]:
                mini.append(leaf)
                leaf -= 1
            else:
                mini.append(node)
                node += 1
        left[i], right[i] = mini
        count[i] = count[mini[0]] + count[mini[1]]
    return left, right


def _preorder(left: list[int], right: list[int], root: int) -> list[tuple[int, int]]:
    """(node, parent) in dfs order: node, its left subtree, its right subtree."""
    out, stack = [], [(root, -1)]
    while stack:
        node, parent = stack.pop()
        out.append((node, parent))
        if left[node] != -1:
            stack.append((right[node], node))
            stack.append((left[node], node))
    return out
