"""A natural-language prose corpus assembled from the licence texts already on this machine.

    python -m bench.prose_corpus --out data/recipe_bench/prose.jsonl       # then, as recipe_bench does:
    python -m tools.prepare data/recipe_bench/prose.jsonl --tokenizer char --val-split 0.1 \
        --out data/recipe_bench/prose
    python -m bench.prose_corpus --paragraphs --out data/doc_bench/paragraphs.jsonl   # short documents

English legal prose, one document per licence text, taken in this fixed order until the corpus
holds `TARGET_CHARS` characters (aiming above MIN_CHARS, 1M, on a machine with enough licence text;
`check_size` says when it is not; everything after the target is left out):

1. the licence and notice files of every installed Python distribution (`importlib.metadata`),
   distributions sorted by name and version, files by path; a file counts when its name is
   LICENSE/LICENCE/COPYING/NOTICE (any case, with or without a suffix such as `.txt`,
   `-MIT` or `.APACHE`) and it is not code or markup (`.py`, `.json`, `.html`, ...);
2. Debian's `/usr/share/common-licenses/*` (the full GPL, LGPL, Apache, MPL, ... texts), by name;
3. Debian's `/usr/share/doc/*/copyright` files, by package name.

With --paragraphs each of those texts is cut at its blank lines (a line of nothing but white
space) and every non-blank paragraph is a document of its own (its own leading and trailing
white space removed, one newline added): the short-document corpus of bench/doc_bench.py.

A text that is not UTF-8 is skipped. Identical texts (compared with runs of whitespace collapsed)
are kept once, at their first place: dozens of packages ship the same MIT or Apache text.
The corpus is therefore the same on every machine with the same installed packages, and
`manifest` records each document's source and the SHA-256 of the whole corpus to check that.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

TARGET_CHARS = 1_250_000
MIN_CHARS = 1_000_000  # the benchmark's floor: at least 1 MB of prose
_LICENCE_NAME = re.compile(r"(LICEN[CS]E|COPYING|NOTICE)([._-][A-Za-z0-9._-]*)?", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_NOT_PROSE = {".py", ".pyi", ".json", ".html", ".htm", ".xml", ".toml", ".yaml", ".yml", ".c", ".h",
              ".cfg", ".in", ".sh", ".js", ".css", ".pdf", ".gz"}


def _python_licences() -> Iterator[tuple[str, Path]]:
    dists = sorted(importlib.metadata.distributions(),
                   key=lambda d: ((d.metadata["Name"] or "").lower(), d.version or ""))
    for dist in dists:
        files = sorted(dist.files or [], key=str)
        for f in files:
            if _LICENCE_NAME.fullmatch(f.name) and Path(f.name).suffix.lower() not in _NOT_PROSE:
                yield f"python:{dist.metadata['Name']}=={dist.version}:{f}", Path(f.locate())


def _debian_texts() -> Iterator[tuple[str, Path]]:
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        for path in sorted(common.iterdir()):
            yield f"debian:common-licenses/{path.name}", path
    docs = Path("/usr/share/doc")
    if docs.is_dir():
        for path in sorted(docs.glob("*/copyright")):
            yield f"debian:doc/{path.parent.name}/copyright", path


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def documents(target_chars: int = TARGET_CHARS) -> Iterator[tuple[str, str]]:
    """(source, text) in the documented order, deduplicated, until `target_chars` characters."""
    seen: set[str] = set()
    total = 0
    for source, path in itertools.chain(_python_licences(), _debian_texts()):
        text = _read_text(path)
        if not text or not text.strip():
            continue
        key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        yield source, text
        total += len(text)
        if total >= target_chars:
            return


def paragraphs(docs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Each document's paragraphs (cut at blank lines) as documents: (source#k, text)."""
    for source, text in docs:
        for k, para in enumerate(p.strip() for p in _BLANK_LINE.split(text)):
            if para:
                yield f"{source}#{k}", para + "\n"


def write_corpus(out: Path, target_chars: int = TARGET_CHARS, by_paragraph: bool = False) -> dict:
    """Write the corpus as JSON lines ({"text", "source"}), and `<out>.manifest.json`; returns the manifest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, sources, chars = hashlib.sha256(), [], 0
    tmp = out.with_name(out.name + ".tmp")
    docs = documents(target_chars)
    with tmp.open("w", encoding="utf-8") as f:
        for source, text in paragraphs(docs) if by_paragraph else docs:
            f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
            digest.update(text.encode())
            sources.append(source)
            chars += len(text)
    tmp.replace(out)
    manifest = {"documents": len(sources), "chars": chars, "sha256": digest.hexdigest(), "sources": sources}
    out.with_name(out.name + ".manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/recipe_bench/prose.jsonl"), help="JSON-lines file to write")
    p.add_argument("--chars", type=int, default=TARGET_CHARS, help=f"stop after this many characters (default {TARGET_CHARS:,})")
    p.add_argument("--paragraphs", action="store_true", help="one document per paragraph (short documents)")
    args = p.parse_args(argv)
    m = write_corpus(args.out, args.chars, args.paragraphs)
    print(f"{args.out}: {m['documents']} documents, {m['chars']:,} characters, sha256 {m['sha256'][:16]}")
    check_size(m)


def check_size(manifest: dict) -> None:
    """Exit with a clear message when this machine had less than MIN_CHARS of licence text."""
    if manifest["chars"] < MIN_CHARS:
        sys.exit(f"error: only {manifest['chars']:,} characters of licence text on this machine; the benchmark "
                 f"wants at least {MIN_CHARS:,} (install more packages with licence files)")


if __name__ == "__main__":
    main()
