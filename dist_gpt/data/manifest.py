"""`manifest.json`: what a dataset directory holds. JSON only (never pickle), written last.

The manifest names the tokenizer (spec, fingerprint, its file if it has one), the vocabulary size
and dtype, every shard of every split with its token count and checksum, each split's document
index (version 2), how many UTF-8 source bytes each split came from (for bits per byte), where the
data came from and the exact request (`request`) that built it, so prepare can tell "same inputs
and options" from "something else".

Version 1 (dist_gpt 0.1.0) is version 2 without the document indexes: it still reads, and
everything but document-aware training works on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dist_gpt.errors import DataError

MANIFEST = "manifest.json"
FORMAT_NAME = "dist_gpt.dataset"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no document index
SPLITS = ("train", "val")


def load_manifest(directory: Path, hint: str) -> dict:
    """Read and structurally check `directory/manifest.json`; `hint` says what to re-run."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise DataError(f"dataset directory {directory} does not exist; {hint}")
    if not path.is_file():
        raise DataError(f"{path} is missing (no complete dataset in {directory}); {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e}); {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a dist_gpt dataset manifest; {hint}")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{path}: manifest version {manifest.get('version')}, this dist_gpt reads versions "
                        f"{' and '.join(map(str, READABLE_VERSIONS))}; {hint}")
    try:
        for split in SPLITS:
            entry = manifest["splits"][split]
            for shard in entry["shards"]:
                _ = (shard["file"], int(shard["num_tokens"]), str(shard["sha256"]))
            _ = (int(entry["num_tokens"]), int(entry["source_bytes"]))
            if manifest["version"] >= 2:
                index = entry["doc_index"]
                _ = (index["file"], int(index["documents"]), str(index["sha256"]))
        _ = (int(manifest["vocab_size"]), manifest["dtype"], manifest["tokenizer"]["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: manifest is missing or has a bad field ({e}); {hint}") from None
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    """Atomic write: temp name, fsync, rename. A manifest on disk means the dataset is complete."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
