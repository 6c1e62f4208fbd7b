"""Small datasets for the data tests, built through the real writer (no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_gpt.data.format import HEADER_SIZE, ShardHeader, ShardWriter, dtype_code_for_vocab
from dist_gpt.data.manifest import SPLITS
from dist_gpt.data.tokenizers import ByteTokenizer
from dist_gpt.data.writer import DEFAULT_SHARD_TOKENS, DatasetWriter


def counting_dataset(directory: Path, shard_lengths=(5000, 3000, 7000, 1200), val_lengths=(2500, 900),
                     shard_tokens: int | None = None) -> Path:
    """A byte dataset with one shard per length; token = (position + 37 * shard) % 251."""
    def make(n, k):
        return ((np.arange(n) + 37 * k) % 251).astype(np.uint8)

    train = [make(n, k) for k, n in enumerate(shard_lengths)]
    val = [make(n, 100 + k) for k, n in enumerate(val_lengths)]
    w = DatasetWriter(Path(directory), ByteTokenizer(), shard_tokens or max(shard_lengths + val_lengths))
    for a in train:
        w.write("train", a, source_bytes=a.size, doc_starts=[0])
        w.close_shard("train")
    for a in val:
        w.write("val", a, source_bytes=a.size, doc_starts=[0])
        w.close_shard("val")
    w.finish({"kind": "test"})
    return directory


def random_dataset(directory: Path, train_tokens: int = 20000, val_tokens: int = 4000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    write_dataset(directory, ByteTokenizer(), {"train": [rng.integers(0, 256, train_tokens, dtype=np.uint8)],
                                               "val": [rng.integers(0, 256, val_tokens, dtype=np.uint8)]},
                  shard_tokens=train_tokens // 3 + 1)
    return Path(directory)


def documents_dataset(directory: Path, train_docs: int = 400, val_docs: int = 40, shard_tokens: int = 3000,
                      seed: int = 0) -> Path:
    """A byte dataset of documents of mixed lengths (mostly short, some longer than a 16-token
    block), every token of document k equal to 1 + k % 250, so a row shows where documents change;
    shards cut documents, so some run across a shard's end."""
    rng = np.random.default_rng(seed)
    w = DatasetWriter(Path(directory), ByteTokenizer(), shard_tokens)
    for split, n in (("train", train_docs), ("val", val_docs)):
        for k in range(n):
            length = int(rng.integers(40, 120)) if k % 7 == 0 else int(rng.integers(1, 14))
            w.write(split, np.full(length, 1 + k % 250, dtype=np.uint8), source_bytes=length, doc_starts=[0])
    w.finish({"kind": "test"})
    return Path(directory)


def as_version_1(manifest: dict) -> list[str]:
    """Turn a manifest (a dict, changed in place) into what dist_gpt 0.1.0 wrote: version 1, no checksum,
    no document indexes. Returns the index files it no longer names."""
    manifest["version"] = 1
    manifest.pop("checksum", None)
    return [manifest["splits"][split].pop("doc_index")["file"] for split in ("train", "val")]


def open_memmap(path: Path | str, header: ShardHeader) -> np.ndarray:
    """A read-only view of a shard's tokens (training reads with pread instead: flat memory)."""
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.num_tokens,))


def write_shard(path: Path | str, tokens: np.ndarray, vocab_size: int, tokenizer_fingerprint: str,
                dtype_code: int | None = None) -> ShardHeader:
    """Write a whole shard at once, through the real ShardWriter."""
    writer = ShardWriter(path, dtype_code or dtype_code_for_vocab(vocab_size), vocab_size, tokenizer_fingerprint)
    try:
        writer.write(np.asarray(tokens))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def write_dataset(directory: Path, tokenizer, splits: dict[str, list[np.ndarray]],
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, source: dict | None = None) -> dict:
    """Write a small dataset from in-memory token arrays (one document per array)."""
    writer = DatasetWriter(directory, tokenizer, shard_tokens)
    for split in SPLITS:
        for tokens in splits.get(split, []):
            writer.write(split, np.asarray(tokens), source_bytes=int(np.asarray(tokens).size), doc_starts=[0])
    return writer.finish(source or {"kind": "arrays"})
