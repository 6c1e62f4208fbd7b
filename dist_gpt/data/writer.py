"""`DatasetWriter`: streams token arrays into `train_*.bin` / `val_*.bin` shards, the documents'
start offsets into `train.docs` / `val.docs`, and writes the manifest.

Shards roll over every `shard_tokens` tokens; each is written under a temporary name and renamed
when complete (see `format.ShardWriter`), and `manifest.json` is written last, so a directory with
a manifest is always a complete dataset. Used by prepare, and by tests that need a small dataset.
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import numpy as np

from dist_gpt import hooks
from dist_gpt.data.docindex import DocIndexWriter, index_name
from dist_gpt.data.format import DTYPE_NAMES, ShardHeader, ShardWriter, dtype_code_for_vocab
from dist_gpt.data.manifest import FORMAT_NAME, FORMAT_VERSION, SPLITS, write_manifest

DEFAULT_SHARD_TOKENS = 100_000_000


class DatasetWriter:
    def __init__(self, directory: Path, tokenizer, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.shard_tokens = shard_tokens
        self.dtype_code = dtype_code_for_vocab(tokenizer.vocab_size)
        self.shards: dict[str, list[tuple[str, ShardHeader]]] = {s: [] for s in SPLITS}
        self.source_bytes = {s: 0 for s in SPLITS}
        self.written = {s: 0 for s in SPLITS}  # tokens appended to each split so far
        self._open: dict[str, ShardWriter | None] = {s: None for s in SPLITS}
        self._docs = {s: DocIndexWriter(self.directory / index_name(s)) for s in SPLITS}

    def write(self, split: str, tokens: np.ndarray, source_bytes: int = 0, doc_starts=()) -> None:
        """Append tokens to a split (in order), counting the UTF-8 source bytes they came from;
        `doc_starts` are the offsets in `tokens` where a document starts."""
        self.source_bytes[split] += source_bytes
        starts = np.asarray(doc_starts, dtype=np.int64)
        self._docs[split].add(self.written[split] + starts[starts < tokens.size])  # an empty document has no start
        self.written[split] += int(tokens.size)
        while tokens.size:
            writer = self._open[split]
            if writer is None:
                name = f"{split}_{len(self.shards[split]):05d}.bin"
                writer = self._open[split] = ShardWriter(self.directory / name, self.dtype_code,
                                                         self.tokenizer.vocab_size, self.tokenizer.fingerprint)
            room = self.shard_tokens - writer.num_tokens
            writer.write(tokens[:room])
            tokens = tokens[room:]
            if writer.num_tokens >= self.shard_tokens:
                self.close_shard(split)

    def close_shard(self, split: str) -> None:
        """End the split's current shard; the next tokens start a new one."""
        writer = self._open[split]
        if writer is not None:
            self.shards[split].append((writer.path.name, writer.close()))
            self._open[split] = None
            hooks.pause("shard")  # test-only: lets a test interrupt prepare with a complete shard on disk

    @property
    def documents(self) -> dict[str, int]:
        return {s: self._docs[s].documents for s in SPLITS}

    def abort(self) -> None:
        """Remove every partial (.tmp) shard and index; complete shards stay (they are valid on their own)."""
        for split in SPLITS:
            if self._open[split] is not None:
                self._open[split].abort()
                self._open[split] = None
            self._docs[split].abort()

    def finish(self, source: dict, request: dict | None = None, command: str | None = None,
               extra: dict | None = None) -> dict:
        """Close the last shards and write manifest.json. Returns the manifest."""
        index = {}
        for split in SPLITS:
            self.close_shard(split)
            header = self._docs[split].close(sum(h.num_tokens for _, h in self.shards[split]))
            index[split] = {"file": index_name(split), "documents": header.documents, "sha256": header.checksum}
        tok = self.tokenizer
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokenizer": {"name": tok.name, "spec": tok.spec, "fingerprint": tok.fingerprint,
                          "file": tok.spec.get("file"), "eot_id": tok.eot_id},
            "vocab_size": tok.vocab_size,
            "dtype": DTYPE_NAMES[self.dtype_code],
            "splits": {
                split: {
                    "num_tokens": sum(h.num_tokens for _, h in self.shards[split]),
                    "source_bytes": self.source_bytes[split],
                    "documents": index[split]["documents"],
                    "shards": [{"file": name, "num_tokens": h.num_tokens, "sha256": h.checksum}
                               for name, h in self.shards[split]],
                    "doc_index": index[split],
                }
                for split in SPLITS
            },
            "source": source,
            "request": request or {},
            "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            **(extra or {}),
        }
        write_manifest(self.directory, manifest)
        return manifest
