"""`ensure_default_dataset`: the embedded default dataset, built on first use.

The trainer calls it on rank 0 (the others wait at a barrier) when `data.path` is the default
and missing, so `python -m dist_gpt.train` works on a fresh machine with nothing downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_gpt.data.manifest import MANIFEST
from dist_gpt.data.prepare import PrepareOptions, prepare


def ensure_default_dataset(path: str | Path = "data/stdlib") -> Path:
    """Build the stdlib byte-level dataset at `path` unless a complete dataset is there already."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    command = f"python -m tools.prepare --source stdlib --tokenizer byte --out {path}"
    print(f"dataset {path} not found: building the default one (the Python standard library's source, "
          f"byte tokens), as `{command}` would", file=sys.stderr, flush=True)
    return prepare(PrepareOptions(out=str(path), source="stdlib", tokenizer="byte", command=command))
