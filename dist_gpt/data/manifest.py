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
import re
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


def not_a_dataset(directory: Path, hint: str) -> str:
    """Why `directory` (which has no manifest.json) is not a dataset, with the way out that fits what
    is there: a file of a dataset (use its directory); any other file, or a directory of other files
    (raw text: prepare it into a directory of its own, never into itself); shards without their
    manifest (re-run the prepare that made them); nothing (`hint`: how to build a dataset there)."""
    if directory.is_file():
        if (directory.parent / MANIFEST).is_file():
            return (f"{directory} is a file of the dataset {directory.parent}, not a dataset directory: pass the "
                    f"dataset's directory, {directory.parent}")
        return f"{directory} is a file, not a dataset directory: {_prepare_elsewhere(directory)}"
    if not directory.is_dir():
        return f"dataset directory {directory} does not exist; {hint}"
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    if any(re.fullmatch(r"(train|val)_\d+\.bin", name) for name in names):
        return (f"{directory / MANIFEST} is missing (shards without their manifest: an interrupted copy, or "
                "deleted): re-run the prepare command that made the dataset, with --force")
    if names:
        return (f"{directory} is not a dataset (no {MANIFEST}) but holds {len(names)} other file(s), e.g. "
                f"{names[0]}: {_prepare_elsewhere(directory)}")
    return f"{directory / MANIFEST} is missing ({directory} is empty); {hint}"


def _prepare_elsewhere(source: Path) -> str:
    """The prepare command that makes a dataset of the text at `source`, in a directory of its own."""
    out = Path("data") / (source.name.split(".")[0] or "mine")
    if out.resolve() == source.resolve():
        out = source.with_name(source.name + "-tokens")
    return (f"to train on this text, prepare it into a dataset directory of its own, "
            f"`dist-gpt-prepare {source} --out {out}`, and use that directory")


def load_manifest(directory: Path, hint: str) -> dict:
    """Read and structurally check `directory/manifest.json`; `hint` says what to re-run."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(not_a_dataset(Path(directory), hint))
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
