"""`Dataset.open(path)`: a validated dataset directory and a flat-memory reader of its tokens.

Opening is cheap and strict: the manifest is parsed, and every shard's and document index's header
and file size are checked against it (no full checksum: that is `python -m tools.shards verify`, or
`data.verify`).
Tokens are read with `os.preadv` into caller-owned buffers, never through a long-lived memmap, so
the process's resident memory stays flat however large the corpus (the kernel's page cache is
shared and reclaimable; a memmap's touched pages count against the process until unmapped).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dist_gpt.data.docindex import check_doc_index, read_doc_header, read_doc_starts
from dist_gpt.data.format import DTYPE_NAMES, DTYPES, HEADER_SIZE, read_header, verify_payload
from dist_gpt.data.manifest import SPLITS, load_manifest
from dist_gpt.data.tokenizers import check_spec_fingerprint, tokenizer_from_spec
from dist_gpt.errors import DataError

DEFAULT_PREPARE = "dist-gpt-prepare --source stdlib --tokenizer byte --out {path}"


@dataclass(frozen=True)
class Shard:
    path: Path
    num_tokens: int
    checksum: str


class Dataset:
    """A dataset directory: manifest.json, optional tokenizer file, train_*.bin and val_*.bin."""

    def __init__(self, path: Path, manifest: dict, shards: dict[str, list[Shard]], rerun: str = ""):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.rerun = rerun  # the prepare command that rebuilds it, with --force
        self.vocab_size: int = int(manifest["vocab_size"])
        self.dtype_code: int = next(c for c, n in DTYPE_NAMES.items() if n == manifest["dtype"])
        self.dtype: np.dtype = DTYPES[self.dtype_code]
        tok = manifest["tokenizer"]
        self.tokenizer_fingerprint: str = tok["fingerprint"]
        self.eot_id: int | None = tok.get("eot_id")
        # Dataset identity: the tokenizer and the exact bytes of every shard, in order.
        ident = hashlib.sha256(self.tokenizer_fingerprint.encode())
        for split in SPLITS:
            for s in shards[split]:
                ident.update(f"{split}:{s.path.name}:{s.checksum}".encode())
        self.fingerprint: str = ident.hexdigest()

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "Dataset":
        path = Path(path)
        manifest = load_manifest(path, hint=f"build the default dataset there with `{DEFAULT_PREPARE.format(path=path)}`, or prepare your own corpus into it")
        hint = f"re-run `{manifest.get('command') or DEFAULT_PREPARE.format(path=path)}` with --force"
        if manifest["dtype"] not in DTYPE_NAMES.values():
            raise DataError(f"{path / 'manifest.json'}: unknown dtype {manifest['dtype']!r}; {hint}")
        try:  # cheap (a hash of the spec or of the tokenizer file): sampling and checkpoints need it
            check_spec_fingerprint(manifest["tokenizer"]["spec"], manifest["tokenizer"]["fingerprint"], path)
        except DataError as e:
            raise DataError(f"{e}; {hint}") from None
        shards: dict[str, list[Shard]] = {}
        for split in SPLITS:
            shards[split] = []
            for entry in manifest["splits"][split]["shards"]:
                shard_path = path / entry["file"]
                try:
                    header = read_header(shard_path)
                    expect = (manifest["vocab_size"], manifest["dtype"], manifest["tokenizer"]["fingerprint"], entry["num_tokens"], entry["sha256"])
                    got = (header.vocab_size, DTYPE_NAMES[header.dtype_code], header.tokenizer_fingerprint, header.num_tokens, header.checksum)
                    if got != expect:
                        names = ("vocab size", "dtype", "tokenizer fingerprint", "token count", "checksum")
                        diff = next(n for n, a, b in zip(names, got, expect) if a != b)
                        raise DataError(f"{shard_path}: its {diff} does not match manifest.json (shard from another prepare run?)")
                    if verify:
                        verify_payload(shard_path, header)
                except DataError as e:
                    raise DataError(f"{e}; {hint}") from None
                shards[split].append(Shard(shard_path, header.num_tokens, header.checksum))
        if not shards["train"] or sum(s.num_tokens for s in shards["train"]) == 0:
            raise DataError(f"{path}: the train split is empty; {hint}")
        for split in SPLITS if "doc_index" in manifest["splits"]["train"] else ():
            _check_doc_index(path, manifest["splits"][split], verify, hint)
        return cls(path, manifest, shards, f"re-run `{manifest.get('command') or DEFAULT_PREPARE.format(path=path)}` with --force")

    @cached_property
    def tokenizer(self):
        """Loaded on first use (gpt2 needs tiktoken's files; training never needs the tokenizer)."""
        tok = tokenizer_from_spec(self.manifest["tokenizer"]["spec"], self.path)
        if tok.fingerprint != self.tokenizer_fingerprint:
            raise DataError(f"{self.path}: the tokenizer differs from the one that made the shards (fingerprint mismatch)")
        return tok

    def num_tokens(self, split: str) -> int:
        return sum(s.num_tokens for s in self._split(split))

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 source bytes per token of a split: bits/byte = loss_nats / ln 2 / bytes_per_token."""
        tokens = self.num_tokens(split)
        return self.manifest["splits"][split]["source_bytes"] / tokens if tokens else float("nan")

    @property
    def has_doc_index(self) -> bool:
        return "doc_index" in self.manifest["splits"]["train"]

    def doc_starts(self, split: str, needed_by: str) -> list[np.ndarray]:
        """Where each document starts, per shard of the split: int64 offsets in that shard, sorted
        (a shard that begins inside a document has no 0). `needed_by` names the option in the
        error a dataset without a document index gets."""
        if not self.has_doc_index:
            raise DataError(f"{self.path} has no document index (made by dist_gpt 0.1.0, manifest version 1), which "
                            f"{needed_by} needs; {self.rerun}")
        path = self.path / self.manifest["splits"][split]["doc_index"]["file"]
        starts = read_doc_starts(path, read_doc_header(path))
        ends = np.cumsum([s.num_tokens for s in self._split(split)])
        bounds = np.searchsorted(starts, np.concatenate([[0], ends]))
        return [starts[lo:hi] - (end - s.num_tokens)
                for lo, hi, end, s in zip(bounds[:-1], bounds[1:], ends, self._split(split))]

    def _split(self, split: str) -> list[Shard]:
        if split not in self.shards:
            raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return self.shards[split]

    def reader(self, split: str) -> "TokenReader":
        return TokenReader(self._split(split), self.dtype, self.vocab_size)


def _check_doc_index(path: Path, entry: dict, verify: bool, hint: str) -> None:
    try:
        check_doc_index(path, entry, full=verify)
    except DataError as e:
        raise DataError(f"{e}; {hint}") from None


class TokenReader:
    """Reads token spans of one split with positional reads; keeps at most `max_open` files open."""

    def __init__(self, shards: list[Shard], dtype: np.dtype, vocab_size: int, max_open: int = 64):
        self.shards, self.dtype, self.vocab_size, self.max_open = shards, dtype, vocab_size, max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        # ids can exceed the vocabulary only when the dtype can hold more values than it has
        self._check_ids = vocab_size < (1 << (8 * dtype.itemsize))

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.shards[shard].path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{self.shards[shard].path}: cannot open shard ({e.strerror})") from None
            self._fds[shard] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def read(self, shard_ids: np.ndarray, starts: np.ndarray, out: np.ndarray, rows: np.ndarray | None = None,
             check: bool = True) -> np.ndarray:
        """Fill out[i] (one row of L tokens) from shard shard_ids[i] at token starts[i] (out[rows[i]] when
        `rows` is given: a mixture fills one buffer from several datasets, and checks the ids itself
        with check=False and `check_ids`)."""
        itemsize = self.dtype.itemsize
        nbytes = out.shape[1] * itemsize
        targets = range(len(shard_ids)) if rows is None else rows.tolist()
        for row, s, start in zip(targets, shard_ids.tolist(), starts.tolist()):
            got = os.preadv(self._fd(s), [out[row]], HEADER_SIZE + start * itemsize)
            if got != nbytes:
                raise DataError(f"{self.shards[s].path}: short read at token {start} (file truncated since opening?)")
        if check:
            self.check_ids(shard_ids, starts, out if rows is None else out[rows])
        return out

    def check_ids(self, shard_ids: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
        """DataError naming the shard when a row read from (shard_ids, starts) holds an id >= the vocabulary."""
        if self._check_ids and out.size and int(out.max()) >= self.vocab_size:
            row = int(np.argmax((out >= self.vocab_size).any(axis=1)))
            path = self.shards[int(shard_ids[row])].path
            raise DataError(f"{path}: token id {int(out[row].max())} near token {int(starts[row])} is >= the vocabulary "
                            f"size {self.vocab_size} (the shard is corrupt); run `python -m tools.shards verify {path.parent}`")

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
