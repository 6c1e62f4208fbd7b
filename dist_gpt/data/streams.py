"""Inputs read in one sequential pass: gzip- and zstd-compressed files, and parquet files.

A compressed stream has no random access and a parquet row group decodes front to back, so such a
file cannot be cut into byte ranges that workers read on their own, as plain files are
(sources.py). Prepare's parent process reads it once, start to end, and cuts what it decodes into
work units of about --chunk-mb that carry their content to the encoding workers: compressed text
and jsonl are cut exactly where plain files are cut; parquet rows are grouped into units of about
that many bytes. Memory stays bounded by the unit size, whatever the size of the file, of a zstd
frame or of a parquet row group.

- `NAME.jsonl.gz`, `NAME.jsonl.zst`: one document per line, as `.jsonl`; `NAME.EXT.gz`,
  `NAME.EXT.zst` (e.g. `.txt.gz`): one text document. gzip files may hold several members and zstd
  files several frames. A file that is corrupt or ends inside a member or frame is an error naming
  the file.
- `NAME.parquet`: one document per row of a string column (--text-field, default `text`; a null is
  an empty document), read in record batches of about a unit's bytes through a 1 MiB read buffer,
  never a whole row group or column chunk at once.

Decompressing is sequential per file and runs in the parent while the workers encode the previous
units: zstd and gzip decompress text at hundreds of MB/s on one core, faster than the workers
encode it (docs/FORMAT.md, "Prepare"). pyarrow and zstandard are optional dependencies
(`pip install 'dist_gpt[corpora]'`), imported only when such a file is given.
"""

from __future__ import annotations

import gzip
import importlib
import zlib
from collections.abc import Callable, Iterator

from dist_gpt.data.sources import BOUNDARY_WINDOW, InputFile, Unit, char_start, find_cut
from dist_gpt.errors import DataError

READ_BYTES = 1 << 16          # compressed bytes fed to the decompressor at a time
PARQUET_BUFFER = 1 << 20      # pyarrow's read buffer per column chunk (0 would read whole chunks)
MAX_BATCH_ROWS = 1 << 16


def optional_module(name: str, path: str, package: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"{path}: reading it needs {package}: pip install 'dist_gpt[corpora]' "
                        f"(or pip install {package})") from None


def stream_units(f: InputFile, index: int, first_doc: int, chunk_bytes: int, field: str) -> Iterator[Unit]:
    """The work units of a compressed or parquet file, in order, from one pass over it."""
    if f.kind == "parquet":
        return _parquet_units(f, index, first_doc, chunk_bytes, field)
    return _decompressed_units(f, index, first_doc, chunk_bytes)


# ---------------------------------------------------------------- gzip and zstd

def _decompressed_blocks(f: InputFile, raw) -> Iterator[bytes]:
    """The decompressed bytes of the open file `raw`, block by block; EOFError when it ends early."""
    if f.compression == "gz":
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:  # reads every member
            while block := gz.read(1 << 20):
                yield block
        return
    zstd = optional_module("zstandard", f.path, "zstandard")
    dctx = zstd.ZstdDecompressor()
    frame, inside = dctx.decompressobj(), False
    while data := raw.read(READ_BYTES):
        while data:
            if out := frame.decompress(data):
                yield out
            inside = not frame.eof
            data = b""
            if frame.eof:  # the next frame starts in what this one left over
                data, frame = frame.unused_data, dctx.decompressobj()
    if inside:
        raise EOFError("the file ends inside a zstd frame")


def _read_errors(f: InputFile) -> tuple:
    errors = (OSError, EOFError, zlib.error)
    if f.compression == "zst":
        errors += (optional_module("zstandard", f.path, "zstandard").ZstdError,)
    return errors


def _damaged(f: InputFile, e: Exception) -> DataError:
    what = "gzip" if f.compression == "gz" else "zstd"
    return DataError(f"{f.path}: not a readable {what} file, corrupt or truncated ({e}); "
                     "re-download or re-compress it")


def count_compressed_lines(f: InputFile, progress: Callable[[int], object] | None = None) -> int:
    """Documents of a compressed .jsonl file, counted as `_decompressed_units` counts them (its lines;
    a last line without a newline counts), in one extra decompression pass; `progress(n)` gets the
    compressed bytes read."""
    lines, last, done = 0, b"\n", 0
    try:
        with open(f.path, "rb") as raw:
            for block in _decompressed_blocks(f, raw):
                lines += block.count(b"\n")
                last = block[-1:]
                if progress is not None and raw.tell() > done:
                    progress(raw.tell() - done)
                    done = raw.tell()
    except _read_errors(f) as e:
        raise _damaged(f, e) from None
    return lines + (last != b"\n")


def _decompressed_units(f: InputFile, index: int, first_doc: int, chunk: int) -> Iterator[Unit]:
    """Cut the decompressed stream where a plain file of the same kind is cut (sources.find_cut)."""
    errors = _read_errors(f)
    try:
        with open(f.path, "rb") as raw:
            blocks = _decompressed_blocks(f, raw)
            buf, pos, used, eof = bytearray(), 0, 0, False
            while True:
                cut = find_cut(buf, chunk, f.kind) if len(buf) > chunk else -1
                while cut < 0 and not eof:
                    block = next(blocks, None)
                    if block is None:
                        eof = True
                        break
                    scanned = max(chunk, len(buf))  # no cut before here: search only the new bytes
                    buf += block
                    if len(buf) > chunk:
                        cut = find_cut(buf, scanned, f.kind)
                    if cut < 0 and f.kind == "text" and len(buf) - chunk >= BOUNDARY_WINDOW:
                        cut = char_start(buf, chunk)  # no newline for a whole window
                last = cut < 0
                piece = bytes(buf if last else buf[:cut])
                del buf[:len(piece)]
                if f.kind == "jsonl":
                    docs = piece.count(b"\n") + (last and piece[-1:] not in (b"", b"\n"))
                else:
                    docs = int(pos == 0)
                input_bytes = f.size - used if last else raw.tell() - used
                if piece or docs:
                    yield Unit(index, pos, pos + len(piece), first_doc, pos == 0, docs, piece, input_bytes)
                used += input_bytes
                pos += len(piece)
                first_doc += docs
                if last:
                    return
    except errors as e:
        raise _damaged(f, e) from None


# ---------------------------------------------------------------- parquet

def _open_parquet(f: InputFile, field: str):
    pa = optional_module("pyarrow", f.path, "pyarrow")
    pq = optional_module("pyarrow.parquet", f.path, "pyarrow")
    try:
        pf = pq.ParquetFile(f.path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{f.path}: not a readable parquet file, corrupt or truncated ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{f.path}: no {field!r} column (it has {', '.join(schema.names[:8])}); "
                        "choose the text column with --text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{f.path}: column {field!r} holds {kind}, not strings; choose the text column with --text-field")
    return pa, pf


def parquet_rows(f: InputFile, field: str) -> int:
    """The row count from the file's footer (and a check that the text column is there)."""
    return _open_parquet(f, field)[1].metadata.num_rows


def _batch_rows(pf, field: str, chunk: int) -> int:
    """Rows per record batch so that a batch holds about `chunk` bytes of text (from the footer)."""
    md = pf.metadata
    size = sum(md.row_group(g).column(c).total_uncompressed_size
               for g in range(md.num_row_groups) for c in range(md.num_columns)
               if md.row_group(g).column(c).path_in_schema == field)
    per_row = size / md.num_rows if md.num_rows else 1.0
    return int(min(MAX_BATCH_ROWS, max(1, chunk // max(per_row, 1.0))))


def _parquet_texts(pa, pf, f: InputFile, field: str, chunk: int) -> Iterator[tuple[str | None, int]]:
    """(text, its UTF-8 bytes) of every row, read in record batches."""
    import pyarrow.compute as pc  # optional dependency: pip install 'dist_gpt[corpora]'

    try:
        for batch in pf.iter_batches(batch_size=_batch_rows(pf, field, chunk), columns=[field], use_threads=False):
            column = batch.column(0)
            yield from zip(column.to_pylist(), pc.binary_length(column).fill_null(0).to_pylist())
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{f.path}: not a readable parquet file, corrupt or truncated ({e})") from None


def _parquet_units(f: InputFile, index: int, first_doc: int, chunk: int, field: str) -> Iterator[Unit]:
    """Units of whole rows, about `chunk` bytes of text each; payload (first row, texts)."""
    pa, pf = _open_parquet(f, field)
    rows = max(pf.metadata.num_rows, 1)
    pos = row = used = 0
    for texts, size in _grouped(_parquet_texts(pa, pf, f, field, chunk), chunk):
        done = round(f.size * (row + len(texts)) / rows)  # file bytes read, pro rata (progress)
        yield Unit(index, pos, pos + size, first_doc + row, True, len(texts), (row, texts), done - used)
        pos, row, used = pos + size, row + len(texts), done


def _grouped(items: Iterator[tuple[str | None, int]], chunk: int) -> Iterator[tuple[list, int]]:
    """Consecutive texts grouped until their bytes reach `chunk`: (texts, bytes)."""
    texts, size = [], 0
    for text, nbytes in items:
        texts.append(text)
        size += nbytes
        if size >= chunk:
            yield texts, size
            texts, size = [], 0
    if texts:
        yield texts, size
