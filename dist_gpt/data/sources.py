"""Corpus inputs for prepare: files, directories, `.jsonl`, stdin, and the stdlib source corpus.

A corpus is an ordered list of `InputFile`s. A `.jsonl` file holds one document per line (the
text field chosen with --jsonl-field); any other file is one document. Large inputs are cut into
`Unit`s of about `chunk_bytes` so workers encode them in parallel with bounded memory. A text file
is cut only after a newline that is followed by a non-space byte (where byte-level BPE's
pre-tokenizer would split anyway, so the cut does not change the tokens); failing that within a
window, at a UTF-8 character boundary. A `.jsonl` file is cut after a newline.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from dist_gpt.errors import DataError

CHUNK_BYTES = 2 << 20          # work unit size: bounds each worker's memory (int64 ids are 8x this)
_BOUNDARY_WINDOW = 1 << 20     # how far past a nominal cut to look for a good boundary
_SPACE = frozenset(b" \t\r\n\x0b\x0c")


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str               # "text" or "jsonl"
    size: int
    mtime_ns: int
    split: str | None = None  # "train"/"val" when given with --train/--val; else chosen by document

    def identity(self) -> list:
        return [self.path, self.kind, self.size, self.mtime_ns, self.split]


@dataclass(frozen=True)
class Unit:
    """Bytes [start, end) of one input file; `first_doc` is the global index of its first document."""
    file: int
    start: int
    end: int
    first_doc: int
    doc_start: bool          # a text file's first unit starts its document
    num_docs: int            # documents (jsonl lines) starting in this unit


def _input(path: Path, split: str | None = None) -> InputFile:
    st = path.stat()
    kind = "jsonl" if path.suffix == ".jsonl" else "text"
    return InputFile(str(path.resolve()), kind, st.st_size, st.st_mtime_ns, split)


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


def count_docs(f: InputFile) -> int:
    """Documents in a file: 1 for text, one per line (its last line may lack a newline) for jsonl."""
    if f.kind == "text":
        return 1
    lines, last = 0, b"\n"
    with open(f.path, "rb") as fh:
        while block := fh.read(1 << 24):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _boundary(fh, pos: int, size: int, kind: str) -> int:
    """The first good cut at or after `pos` (see the module docstring)."""
    while pos < size:
        fh.seek(pos - 1)
        window = fh.read(_BOUNDARY_WINDOW + 1)  # window[0] is the byte before pos
        for i in range(1, len(window)):
            if window[i - 1] == 0x0A and (kind == "jsonl" or window[i] not in _SPACE):
                return pos + i - 1
        if pos + len(window) - 1 >= size:
            break
        if kind == "text":
            for i in range(1, len(window)):  # no newline: any UTF-8 character start
                if window[i] & 0xC0 != 0x80:
                    return pos + i - 1
        pos += len(window) - 1  # a long JSON line: the unit grows to its end
    return size


def plan_units(files: list[InputFile], doc_counts: list[int], chunk_bytes: int = CHUNK_BYTES):
    """Yield the work units of every file in order (reads only small windows at cut points)."""
    first_doc = 0
    for i, f in enumerate(files):
        if f.size <= chunk_bytes:
            yield Unit(i, 0, f.size, first_doc, True, doc_counts[i])
        else:
            with open(f.path, "rb") as fh:
                start, docs_before = 0, 0
                while start < f.size:
                    end = _boundary(fh, start + chunk_bytes, f.size, f.kind)
                    if f.kind == "jsonl":
                        fh.seek(start)
                        n = fh.read(end - start).count(b"\n") + (end == f.size and not _ends_with_newline(fh, f.size))
                    else:
                        n = 1 if start == 0 else 0
                    yield Unit(i, start, end, first_doc + docs_before, start == 0, n)
                    docs_before += n
                    start = end
        first_doc += doc_counts[i]


def _ends_with_newline(fh, size: int) -> bool:
    fh.seek(size - 1)
    return fh.read(1) == b"\n"


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
