"""The work units of prepare's inputs, in order: a plain file is cut at good boundaries (a newline,
for text not before a space) about every `chunk_bytes`, read only in small windows at the cuts; a
compressed or parquet file is read here, once (streams.py), and its units carry their content.
Documents per file: 1 for text, one per line for jsonl, one per row for parquet."""

from __future__ import annotations

from dist_gpt.data.sources import BOUNDARY_WINDOW, CHUNK_BYTES, InputFile, Unit, char_start, find_cut
from dist_gpt.data.streams import count_compressed_lines, parquet_rows, stream_units


def count_docs(f: InputFile, field: str = "text", read_compressed: bool = False, progress=None) -> int | None:
    """Documents in a file: 1 for text, one per line (its last line may lack a newline) for jsonl,
    one per row for parquet (from its footer). Compressed jsonl: None (its lines are counted while it
    is encoded, in one pass), unless `read_compressed`: then it is decompressed once more just to
    count them (`progress(n)` gets the compressed bytes read)."""
    if f.kind == "text":
        return 1
    if f.kind == "parquet":
        return parquet_rows(f, field)
    if f.compression:
        return count_compressed_lines(f, progress) if read_compressed else None
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
        window = fh.read(BOUNDARY_WINDOW + 1)  # window[0] is the byte before pos
        cut = find_cut(window, 1, kind)
        if cut >= 0:
            return pos - 1 + cut
        if pos + len(window) - 1 >= size:
            break
        if kind == "text" and (cut := char_start(window, 1)) >= 0:  # no newline: a character start
            return pos - 1 + cut
        pos += len(window) - 1  # a long JSON line: the unit grows to its end
    return size


def plan_units(files: list[InputFile], doc_counts: list[int | None], chunk_bytes: int = CHUNK_BYTES,
               field: str = "text"):
    """Yield the work units of every file in order (reads only small windows at cut points of plain
    files; streamed files are read here, once, and their units carry their content)."""
    first_doc = 0
    for i, f in enumerate(files):
        if f.streamed:
            for unit in stream_units(f, i, first_doc, chunk_bytes, field):
                first_doc += unit.num_docs
                yield unit
            continue
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
