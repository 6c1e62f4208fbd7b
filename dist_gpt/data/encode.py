"""Encoding work units into token arrays: runs in prepare's worker processes (or in-process).

A worker gets a task (a list of units) and returns, per unit, the tokens of each split, the UTF-8
source bytes they came from, and what was skipped. Which split a document goes to is a pure
function of its index (`DocSplitter`, or `HashSplitter` when the corpus' document count is not
known before encoding), so workers need no coordination and the output does not depend on the
number of workers.

Text policy (docs/FORMAT.md, "Text"): the `byte` tokenizer stores a file's bytes as they are.
Every other tokenizer decodes strict UTF-8: an undecodable byte is an error naming the file and
byte offset, or, with --skip-unknown, dropped and counted. `char` with a vocabulary that has no
`\\r` drops `\\r` (as the notebook does) and counts it; any other character outside a char
vocabulary is an error naming the file, byte offset and character, or skipped with --skip-unknown.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field

import numpy as np

from dist_gpt.data.permutation import FeistelPermutation, mix64, mix_int
from dist_gpt.data.sources import InputFile, Unit, read_unit
from dist_gpt.data.tokenizers import ByteTokenizer, CharTokenizer, tokenizer_from_spec
from dist_gpt.errors import DataError

VAL_KEY = 0xD0C5  # mixed with the user's --seed to choose validation documents


class DocSplitter:
    """Which documents are validation: exactly `val_docs` of `num_docs`, a seeded random choice."""

    def __init__(self, num_docs: int, val_docs: int, seed: int):
        self.num_docs, self.val_docs = num_docs, val_docs
        self.perm = FeistelPermutation(num_docs, VAL_KEY ^ seed) if val_docs else None

    def is_val(self, docs: list[int]) -> list[bool]:
        if self.perm is None or not docs:
            return [False] * len(docs)
        return (self.perm(np.asarray(docs, dtype=np.int64)) < self.val_docs).tolist()


class HashSplitter:
    """Which documents are validation when the corpus' document count is only known once it has
    been read (compressed jsonl is read once): each document independently with probability
    `fraction`, by a seeded hash of its index, so about that fraction of them."""

    def __init__(self, fraction: float, seed: int):
        self.threshold = np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
        self.key = np.uint64(mix_int(VAL_KEY, seed))

    def is_val(self, docs: list[int]) -> list[bool]:
        return (mix64(np.asarray(docs, dtype=np.uint64) ^ self.key) < self.threshold).tolist()


def doc_splits(f: InputFile, docs: list[int], splitter: DocSplitter | None) -> list[str]:
    if f.split:
        return [f.split] * len(docs)
    if splitter is None:
        return ["train"] * len(docs)
    return ["val" if v else "train" for v in splitter.is_val(docs)]


@dataclass
class EncodeOptions:
    tokenizer_spec: dict
    directory: str             # where a tokenizer file lives
    files: list[InputFile]
    splitter: DocSplitter | HashSplitter | None
    jsonl_field: str = "text"
    skip_unknown: bool = False


@dataclass
class UnitResult:
    raw_bytes: int
    tokens: dict = field(default_factory=dict)        # split -> np.ndarray (final dtype)
    source_bytes: dict = field(default_factory=dict)  # split -> int
    doc_starts: dict = field(default_factory=dict)    # split -> offsets in tokens[split] where a document starts
    skipped: dict = field(default_factory=dict)       # what -> count
    chars: str = ""                                   # the chars seen (char vocabulary pass)


_state: dict = {}


def init_worker(options: EncodeOptions, dtype: str | None, library_threads: bool = False) -> None:
    """Per process: build the tokenizer once. In worker processes the tokenizer library's own
    threads are off: the parallelism is the processes."""
    if not library_threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _state["options"] = options
    _state["tokenizer"] = tokenizer_from_spec(options.tokenizer_spec, options.directory) if dtype else None
    _state["dtype"] = np.dtype(dtype) if dtype else None


def encode_task(units: list[Unit]) -> list[UnitResult]:
    return [_encode_unit(u) for u in units]


def iter_train_texts(units: list[Unit], max_bytes: int):
    """Texts of the training documents, in order, up to about max_bytes (for training a BPE)."""
    opts: EncodeOptions = _state["options"]
    seen = 0
    for unit in units:
        res = UnitResult(0)
        docs = list(_documents(unit, res, decode=True))
        splits = doc_splits(opts.files[unit.file], [d[0] for d in docs], opts.splitter)
        for (_, text, _, nbytes), split in zip(docs, splits):
            if split == "train":
                yield text
                seen += nbytes
        if seen >= max_bytes:
            return


def collect_chars_task(units: list[Unit]) -> list[UnitResult]:
    """The char vocabulary pass: the set of characters of each unit."""
    out = []
    for unit in units:
        res = UnitResult(unit.progress_bytes)
        texts = [d[1] for d in _documents(unit, res, decode=True)]
        res.chars = "".join(sorted(set().union(*map(set, texts)))) if texts else ""
        out.append(res)
    return out


class _SkipCounter:
    """A codecs error handler that drops undecodable bytes and counts them."""
    count = 0

    @classmethod
    def handle(cls, err: UnicodeDecodeError):
        cls.count += err.end - err.start
        return "", err.end


codecs.register_error("dist_gpt_skip", _SkipCounter.handle)


def _count(res: UnitResult, what: str, n: int) -> None:
    if n:
        res.skipped[what] = res.skipped.get(what, 0) + n


def _at(f: InputFile, offset: int, within: int = 0) -> str:
    """Where in an input something is: its file and byte offset (of the decompressed stream for a
    compressed file), or row and byte offset in the row's text for parquet."""
    if f.kind == "parquet":
        return f"{f.path}: row {offset}, byte offset {within}"
    return f"{f.path}: {'decompressed ' if f.compression else ''}byte offset {offset + within}"


def _decode(raw: bytes, f: InputFile, offset: int, res: UnitResult) -> tuple[str, int]:
    """Strict UTF-8 (or dropping undecodable bytes with --skip-unknown). Returns (text, its UTF-8 length)."""
    try:
        return raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as e:
        if not _state["options"].skip_unknown:
            raise DataError(f"{_at(f, offset, e.start)}: not valid UTF-8 ({raw[e.start:e.start + 1]!r}); "
                            "fix the file, use --tokenizer byte, or pass --skip-unknown to drop such bytes") from None
    before = _SkipCounter.count
    text = raw.decode("utf-8", errors="dist_gpt_skip")
    dropped = _SkipCounter.count - before
    _count(res, "undecodable bytes", dropped)
    return text, len(raw) - dropped


def _documents(unit: Unit, res: UnitResult, decode: bool):
    """Yield (doc index, text (or bytes if not decode), offset, UTF-8 length) per document; the
    offset is the byte offset in the file (or decompressed stream), or the row for parquet."""
    opts: EncodeOptions = _state["options"]
    f = opts.files[unit.file]
    if f.kind == "parquet":
        first_row, texts = unit.payload
        for j, text in enumerate(texts):
            if text:  # a null or empty row is an empty document
                data = text.encode("utf-8", errors="surrogatepass")
                yield unit.first_doc + j, (text if decode else data), first_row + j, len(data)
        return
    raw = read_unit(f, unit) if unit.payload is None else unit.payload
    if f.kind == "text":
        text, nbytes = _decode(raw, f, unit.start, res) if decode else (raw, len(raw))
        yield unit.first_doc, text, unit.start, nbytes
        return
    offset = unit.start
    for j, line in enumerate(raw.split(b"\n")[: unit.num_docs]):
        where = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            text = json.loads(line)[opts.jsonl_field]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{_at(f, where)}: not a JSON line ({e})") from None
        except (KeyError, TypeError):
            raise DataError(f"{_at(f, where)}: no {opts.jsonl_field!r} field; choose one with --text-field") from None
        if not isinstance(text, str):
            raise DataError(f"{_at(f, where)}: field {opts.jsonl_field!r} is not a string")
        data = text.encode("utf-8", errors="surrogatepass")
        yield unit.first_doc + j, (text if decode else data), where, len(data)


CR_NOTE = "carriage returns (\\r is not in the vocabulary)"


def _char_ids(tok: CharTokenizer, text: str, f: InputFile, offset: int, res: UnitResult) -> tuple[np.ndarray, int]:
    """Char ids of text, applying the \\r and --skip-unknown rules. Returns (ids, UTF-8 bytes kept)."""
    ids = tok.lookup(text)
    drop = ids < 0
    nbytes = len(text.encode("utf-8", errors="surrogatepass"))
    if not drop.any():
        return ids, nbytes
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    unknown = drop.copy()
    if "\r" not in tok.chars:
        cr = codes == 0x0D
        unknown &= ~cr
        _count(res, CR_NOTE, int(cr.sum()))
    if unknown.any():
        if not _state["options"].skip_unknown:
            i = int(np.argmax(unknown))
            within = len(text[:i].encode("utf-8", errors="surrogatepass"))
            raise DataError(f"{_at(f, offset, within)}: character {text[i]!r} (U+{ord(text[i]):04X}) is not in the "
                            "char vocabulary; add it to the vocabulary file or pass --skip-unknown")
        _count(res, "characters outside the vocabulary", int(unknown.sum()))
    gone = codes[drop]
    utf8_len = 1 + (gone >= 0x80).astype(np.int64) + (gone >= 0x800) + (gone >= 0x10000)
    return ids[~drop], nbytes - int(utf8_len.sum())


def _encode_unit(unit: Unit) -> UnitResult:
    opts: EncodeOptions = _state["options"]
    tok, dtype = _state["tokenizer"], _state["dtype"]
    f = opts.files[unit.file]
    res = UnitResult(unit.progress_bytes)
    docs = list(_documents(unit, res, decode=not isinstance(tok, ByteTokenizer)))
    texts = [d[1] for d in docs]
    nbytes = [d[3] for d in docs]
    if isinstance(tok, CharTokenizer):
        arrays, nbytes = [], []
        for _, text, offset, _ in docs:
            ids, n = _char_ids(tok, text, f, offset, res)
            arrays.append(ids)
            nbytes.append(n)
    elif isinstance(tok, ByteTokenizer):
        arrays = [np.frombuffer(t, dtype=np.uint8) for t in texts]
    else:
        arrays = tok.encode_batch_np(texts) if texts else []
    pieces: dict[str, list[np.ndarray]] = {}
    lengths: dict[str, int] = {}  # tokens in pieces[split] so far
    splits = doc_splits(f, [d[0] for d in docs], opts.splitter)
    for ids, n, split in zip(arrays, nbytes, splits):
        if ids.size == 0:
            continue
        parts, at = pieces.setdefault(split, []), lengths.get(split, 0)
        if f.kind != "text" or unit.doc_start:  # every jsonl line and parquet row starts one
            res.doc_starts.setdefault(split, []).append(at)
            if tok.eot_id is not None:  # the end-of-text id is the document's first token
                parts.append(np.array([tok.eot_id], dtype=dtype))
                at += 1
        parts.append(ids.astype(dtype, copy=False))
        lengths[split] = at + ids.size
        res.source_bytes[split] = res.source_bytes.get(split, 0) + n
    res.tokens = {s: np.concatenate(p) if len(p) > 1 else p[0] for s, p in pieces.items()}
    return res
