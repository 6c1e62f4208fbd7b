"""Corpus inputs for prepare: files, directories, `.jsonl`, stdin, and the stdlib source corpus.

A corpus is an ordered list of `InputFile`s. A `.jsonl` file holds one document per line (the
text field chosen with --text-field); a `.parquet` file one per row (streams.py); any other file is
one document. `NAME.jsonl.gz` / `.zst` and `NAME.txt.gz` / `.zst` are those, compressed
(streams.py). Large inputs are cut into `Unit`s of about `chunk_bytes` so workers encode them in
parallel with bounded memory. A text file is cut only after a newline that is followed by a
non-space byte (where byte-level BPE's pre-tokenizer would split anyway, so the cut does not change
the tokens); failing that within a window, at a UTF-8 character boundary. A `.jsonl` file is cut
after a newline. Plain files are cut by reading small windows at the cut points and the workers
read their own units; compressed and parquet files are read once, start to end, by prepare's
parent process, and their units carry what it read (streams.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from dist_gpt.errors import DataError

CHUNK_BYTES = 2 << 20          # work unit size: bounds each worker's memory (int64 ids are 8x this)
BOUNDARY_WINDOW = 1 << 20     # how far past a nominal cut to look for a good boundary
_SPACE = frozenset(b" \t\r\n\x0b\x0c")


COMPRESSIONS = {".gz": "gz", ".zst": "zst"}


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str               # "text", "jsonl" or "parquet"
    size: int               # on disk (compressed, for a compressed file)
    mtime_ns: int
    split: str | None = None  # "train"/"val" when given with --train/--val; else chosen by document
    compression: str | None = None  # "gz" or "zst"

    @property
    def streamed(self) -> bool:
        """Read once, start to end, by prepare's parent (streams.py), not in byte ranges by workers."""
        return self.kind == "parquet" or self.compression is not None

    def identity(self) -> list:
        plain = [self.path, self.kind, self.size, self.mtime_ns, self.split]
        return plain + [self.compression] if self.compression else plain  # a plain file's as before


@dataclass(frozen=True)
class Unit:
    """Bytes [start, end) of one input file; `first_doc` is the global index of its first document.

    A unit of a streamed file (compressed or parquet) carries its content in `payload` (the
    decompressed bytes, or (first row, texts) of parquet rows); start and end then count
    decompressed bytes, and `input_bytes` is how much of the file on disk it used (for progress)."""
    file: int
    start: int
    end: int
    first_doc: int
    doc_start: bool          # a text file's first unit starts its document
    num_docs: int            # documents (jsonl lines, parquet rows) starting in this unit
    payload: object = None
    input_bytes: int | None = None

    @property
    def progress_bytes(self) -> int:
        return self.end - self.start if self.input_bytes is None else self.input_bytes


def _input(path: Path, split: str | None = None) -> InputFile:
    st = path.stat()
    compression = COMPRESSIONS.get(path.suffix)
    inner = Path(path.stem).suffix if compression else path.suffix
    kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(inner, "text")
    if kind == "parquet" and compression:
        raise DataError(f"{path}: a compressed parquet file; parquet compresses its own pages, give the .parquet file")
    return InputFile(str(path.resolve()), kind, st.st_size, st.st_mtime_ns, split, compression)


def list_inputs(args: list[str], include: list[str], split: str | None = None) -> list[InputFile]:
    """Files as given; directories searched recursively for names matching an include glob."""
    files: list[InputFile] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in include))
            if not found:
                raise DataError(f"input directory {path} has no file matching --include {','.join(include)}")
            files += [_input(p, split) for p in found]
        elif path.is_file():
            files.append(_input(path, split))
        else:
            raise DataError(f"input {path} does not exist")
    return files


def spool_stdin(target: Path) -> tuple[InputFile, str]:
    """Copy stdin to a file (bounded memory, and its sha256 identifies the input). Returns (file, sha256)."""
    sha = hashlib.sha256()
    with open(target, "wb") as out:
        while block := sys.stdin.buffer.read(1 << 20):
            sha.update(block)
            out.write(block)
    if target.stat().st_size == 0:
        raise DataError("stdin was empty: pipe a corpus into `python -m tools.prepare -`")
    return _input(target), sha.hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_inputs() -> list[InputFile]:
    """The Python standard library's own .py files (sorted; third-party packages and the few
    deliberately non-UTF-8 test files excluded): the embedded default corpus, present on every
    machine that runs Python."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("site-packages", "dist-packages", "__pycache__") for p in rel):
            continue
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(_input(path))
    if not files:
        raise DataError(f"no Python source files found under the standard library at {root}")
    return files


def find_cut(data: bytes | bytearray, start: int, kind: str) -> int:
    """The first good cut c >= start in data (byte c - 1 a newline and, for text, byte c not a
    space; c < len(data)), or -1."""
    i = data.find(b"\n", max(start - 1, 0))
    while 0 <= i < len(data) - 1:
        if kind == "jsonl" or data[i + 1] not in _SPACE:
            return i + 1
        i = data.find(b"\n", i + 1)
    return -1


def char_start(data: bytes | bytearray, start: int) -> int:
    """The first UTF-8 character start at or after `start` in data, or -1 (text without newlines)."""
    for i in range(start, min(len(data), start + 4)):
        if data[i] & 0xC0 != 0x80:
            return i
    return -1


def read_unit(f: InputFile, unit: Unit) -> bytes:
    with open(f.path, "rb") as fh:
        fh.seek(unit.start)
        data = fh.read(unit.end - unit.start)
    if len(data) != unit.end - unit.start:
        raise DataError(f"{f.path}: changed while being read (expected {unit.end - unit.start} bytes at {unit.start})")
    return data


def inputs_fingerprint(files: list[InputFile]) -> str:
    """Identity of the inputs by path, size and modification time (cheap: no reading)."""
    h = hashlib.sha256()
    for f in files:
        h.update(repr(f.identity()).encode())
    return h.hexdigest()


def describe(files: list[InputFile], kind: str) -> dict:
    summary = {"kind": kind, "files": len(files), "bytes": sum(f.size for f in files)}
    if kind == "stdlib":
        summary.update(root=str(stdlib_root()), python=sys.version.split()[0])
    elif len(files) <= 20:
        summary["paths"] = [f.path for f in files]
    return summary
