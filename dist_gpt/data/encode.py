"""Encoding work units into token arrays: runs in prepare's worker processes (or in-process).

A worker gets a task (a list of units) and returns, per unit, the tokens of each split, the UTF-8
source bytes they came from, and what was skipped. Which split a document goes to is a pure
function of its index (`DocSplitter`), so workers need no coordination and the output does not
depend on the number of workers.

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

from dist_gpt.data.permutation import FeistelPermutation
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
    splitter: DocSplitter | None
    jsonl_field: str = "text"
    skip_unknown: bool = False


@dataclass
class UnitResult:
    raw_bytes: int
    tokens: dict = field(default_factory=dict)        # split -> np.ndarray (final dtype)
    source_bytes: dict = field(default_factory=dict)  # split -> int
    documents: dict = field(default_factory=dict)     # split -> int
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
        res = UnitResult(unit.end - unit.start)
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


def _decode(raw: bytes, path: str, offset: int, res: UnitResult) -> tuple[str, int]:
    """Strict UTF-8 (or dropping undecodable bytes with --skip-unknown). Returns (text, its UTF-8 length)."""
    try:
        return raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as e:
        if not _state["options"].skip_unknown:
            raise DataError(f"{path}: byte offset {offset + e.start}: not valid UTF-8 ({raw[e.start:e.start + 1]!r}); "
                            "fix the file, use --tokenizer byte, or pass --skip-unknown to drop such bytes") from None
    before = _SkipCounter.count
    text = raw.decode("utf-8", errors="dist_gpt_skip")
    dropped = _SkipCounter.count - before
    _count(res, "undecodable bytes", dropped)
    return text, len(raw) - dropped


def _documents(unit: Unit, res: UnitResult, decode: bool):
    """Yield (doc index, text (or bytes if not decode), file byte offset, UTF-8 length) per document."""
    opts: EncodeOptions = _state["options"]
    f = opts.files[unit.file]
    raw = read_unit(f, unit)
    if f.kind == "text":
        text, nbytes = _decode(raw, f.path, unit.start, res) if decode else (raw, len(raw))
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
            raise DataError(f"{f.path}: byte offset {where}: not a JSON line ({e})") from None
        except (KeyError, TypeError):
            raise DataError(f"{f.path}: byte offset {where}: no {opts.jsonl_field!r} field; choose one with --jsonl-field") from None
        if not isinstance(text, str):
            raise DataError(f"{f.path}: byte offset {where}: field {opts.jsonl_field!r} is not a string")
        data = text.encode("utf-8", errors="surrogatepass")
        yield unit.first_doc + j, (text if decode else data), where, len(data)


CR_NOTE = "carriage returns (\\r is not in the vocabulary)"


def _char_ids(tok: CharTokenizer, text: str, path: str, offset: int, res: UnitResult) -> tuple[np.ndarray, int]:
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
            at = offset + len(text[:i].encode("utf-8", errors="surrogatepass"))
            raise DataError(f"{path}: byte offset {at}: character {text[i]!r} (U+{ord(text[i]):04X}) is not in the "
                            "char vocabulary; add it to the vocabulary file or pass --skip-unknown")
        _count(res, "characters outside the vocabulary", int(unknown.sum()))
    gone = codes[drop]
    utf8_len = 1 + (gone >= 0x80).astype(np.int64) + (gone >= 0x800) + (gone >= 0x10000)
    return ids[~drop], nbytes - int(utf8_len.sum())


def _encode_unit(unit: Unit) -> UnitResult:
    opts: EncodeOptions = _state["options"]
    tok, dtype = _state["tokenizer"], _state["dtype"]
    f = opts.files[unit.file]
    res = UnitResult(unit.end - unit.start)
    docs = list(_documents(unit, res, decode=not isinstance(tok, ByteTokenizer)))
    texts = [d[1] for d in docs]
    nbytes = [d[3] for d in docs]
    if isinstance(tok, CharTokenizer):
        arrays, nbytes = [], []
        for _, text, offset, _ in docs:
            ids, n = _char_ids(tok, text, f.path, offset, res)
            arrays.append(ids)
            nbytes.append(n)
    elif isinstance(tok, ByteTokenizer):
        arrays = [np.frombuffer(t, dtype=np.uint8) for t in texts]
    else:
        arrays = tok.encode_batch_np(texts) if texts else []
    pieces: dict[str, list[np.ndarray]] = {}
    splits = doc_splits(f, [d[0] for d in docs], opts.splitter)
    for ids, n, split in zip(arrays, nbytes, splits):
        if ids.size == 0:
            continue
        starts = f.kind == "jsonl" or unit.doc_start
        if starts and tok.eot_id is not None:
            pieces.setdefault(split, []).append(np.array([tok.eot_id], dtype=dtype))
        pieces.setdefault(split, []).append(ids.astype(dtype, copy=False))
        res.source_bytes[split] = res.source_bytes.get(split, 0) + n
        res.documents[split] = res.documents.get(split, 0) + int(starts)
    res.tokens = {s: np.concatenate(p) if len(p) > 1 else p[0] for s, p in pieces.items()}
    return res
