"""`manifest.json`: what a dataset directory holds. JSON only (never pickle), written last.

The manifest names the tokenizer (spec, fingerprint, its file if it has one), the vocabulary size
and dtype, every shard of every split with its token count and checksum, each split's document
index, how many UTF-8 source bytes each split came from (for bits per byte), where the data came from
and the exact request (`request`) that built it, so prepare can tell "same inputs and options" from
"something else", and `checksum`: the SHA-256 of its own canonical JSON without that key, so a
damaged or hand-edited manifest is refused instead of read.

Version 1 (dist_gpt 0.1.0) is version 2 without the document indexes and the checksum: it still
reads, and everything but document-aware training works on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dist_gpt.errors import DataError

MANIFEST = "manifest.json"
FORMAT_NAME = "dist_gpt.dataset"
FORMAT_VERSION = 2       # what prepare writes: document indexes and a checksum
READ_VERSIONS = (1, 2)   # 1: neither
SPLITS = ("train", "val")


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no spaces), its `checksum` key left out."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    version = manifest.get("version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise DataError(f"{path}: manifest version {version!r}, this dist_gpt reads versions 1 and 2; {hint}")
    if (version >= 2 or "checksum" in manifest) and manifest.get("checksum") != manifest_checksum(manifest):
        raise DataError(f"{path}: its checksum does not match its content (the file is damaged or was edited); {hint}")
    try:
        for split in SPLITS:
            entry = manifest["splits"][split]
            for shard in entry["shards"]:
                _plain_name(shard["file"])  # a shard lives in the dataset directory, nowhere else
                _ = (_count(shard["num_tokens"]), str(shard["sha256"]))
            _ = (_count(entry["num_tokens"]), _count(entry["source_bytes"]))
            if version >= 2:
                index = entry["doc_index"]
                _plain_name(index["file"])
                _ = (_count(index["documents"]), str(index["sha256"]))
        tok = manifest["tokenizer"]
        _ = (_count(manifest["vocab_size"]), manifest["dtype"], str(tok["fingerprint"]), tok["spec"]["kind"])
        if tok.get("file") is not None:
            _plain_name(tok["file"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: manifest is missing or has a bad field ({type(e).__name__}: {e}); {hint}") from None
    return manifest


def _count(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _plain_name(name) -> None:
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"{name!r} is not a file name in the dataset directory")


def write_manifest(directory: Path, manifest: dict) -> None:
    """Atomic write, with its checksum: temp name, fsync, rename. A manifest on disk means the dataset is
    complete."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    manifest = {**manifest, "checksum": manifest_checksum(manifest)}
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
