"""The document index: where each document of a split starts (`train.docs`, `val.docs`, beside the
shards). Documented in docs/FORMAT.md.

Byte and char vocabularies have no end-of-text token, so their tokens alone do not say where a
document begins; prepare records it for every tokenizer. The file is a 256-byte header, then one
little-endian uint64 per document: the offset of its first token in the split (the split's shards
concatenated in order), strictly increasing and below the split's token count. Where the
vocabulary has an end-of-text token, a document's first token is that token.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_gpt.data.format import HEADER_SIZE, StagedFile, read_head
from dist_gpt.errors import DataError

MAGIC = b"DGPTDOC\x00"
VERSION = 1
DTYPE = np.dtype("<u8")
_FIELDS = struct.Struct("<8sIQQ32s")  # magic, version, documents, the split's tokens, payload sha256
_CRC = struct.Struct("<I")


def index_name(split: str) -> str:
    return f"{split}.docs"


@dataclass(frozen=True)
class DocIndexHeader:
    documents: int
    num_tokens: int   # of the split: every offset is below it
    checksum: str     # hex sha256 of the payload

    def pack(self) -> bytes:
        fields = _FIELDS.pack(MAGIC, VERSION, self.documents, self.num_tokens, bytes.fromhex(self.checksum))
        head = fields + _CRC.pack(zlib.crc32(fields))
        return head + b"\x00" * (HEADER_SIZE - len(head))


def read_doc_header(path: Path | str) -> DocIndexHeader:
    """Parse and check a document index's header and file size (cheap: no hashing)."""
    path = Path(path)
    raw, size = read_head(path, "document index")
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise DataError(f"{path}: not a dist_gpt document index (bad magic or shorter than its header)")
    fields = raw[:_FIELDS.size]
    _, version, documents, num_tokens, checksum = _FIELDS.unpack(fields)
    (crc,) = _CRC.unpack_from(raw, _FIELDS.size)
    if crc != zlib.crc32(fields) or any(raw[_FIELDS.size + _CRC.size:]):
        raise DataError(f"{path}: document index header is corrupt (header checksum mismatch)")
    if version != VERSION:
        raise DataError(f"{path}: document index version {version}, this dist_gpt reads version {VERSION}")
    if size != HEADER_SIZE + documents * DTYPE.itemsize:
        raise DataError(f"{path}: file is {size} bytes but its header promises {HEADER_SIZE + documents * DTYPE.itemsize} "
                        "(truncated or appended to)")
    return DocIndexHeader(documents, num_tokens, checksum.hex())


def iter_doc_starts(path: Path | str, header: DocIndexHeader, chunk: int = 1 << 20):
    """Yield the offsets in order as int64 arrays of at most `chunk` entries (bounded memory)."""
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        left = header.documents
        while left > 0:
            n = min(left, chunk)
            raw = f.read(n * DTYPE.itemsize)
            if len(raw) != n * DTYPE.itemsize:
                raise DataError(f"{path}: document index ends early (truncated)")
            yield np.frombuffer(raw, dtype=DTYPE).astype(np.int64)
            left -= n


def read_doc_starts(path: Path | str, header: DocIndexHeader) -> np.ndarray:
    """Every offset, int64 (8 bytes per document in memory)."""
    parts = list(iter_doc_starts(path, header))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def verify_doc_index(path: Path | str, header: DocIndexHeader) -> None:
    """Full check: payload checksum, offsets strictly increasing and below the split's tokens."""
    sha, last = hashlib.sha256(), -1
    for starts in iter_doc_starts(path, header):
        sha.update(starts.astype(DTYPE).tobytes())
        if starts.size and (starts[0] <= last or np.any(np.diff(starts) <= 0)):
            raise DataError(f"{path}: document offsets are not strictly increasing (the index is corrupt)")
        if starts.size and starts[-1] >= header.num_tokens:
            raise DataError(f"{path}: a document offset is past the split's {header.num_tokens} tokens")
        last = int(starts[-1]) if starts.size else last
    if sha.hexdigest() != header.checksum:
        raise DataError(f"{path}: payload checksum mismatch (the document index is corrupt)")


def check_doc_index(directory: Path | str, entry: dict, full: bool) -> None:
    """A split's document index against its manifest entry (a dict with "num_tokens" and
    "doc_index"): header and size, and with `full` the checksum and every offset."""
    path = Path(directory) / entry["doc_index"]["file"]
    header = read_doc_header(path)
    want = (entry["doc_index"]["documents"], entry["doc_index"]["sha256"], entry["num_tokens"])
    if (header.documents, header.checksum, header.num_tokens) != want:
        raise DataError(f"{path}: does not match manifest.json (an index from another prepare run?)")
    if full:
        verify_doc_index(path, header)


class DocIndexWriter(StagedFile):
    """Appends document offsets under `<name>.tmp`; the header is written last, then the file renamed."""

    def __init__(self, path: Path | str):
        super().__init__(path)
        self.documents, self.last = 0, -1
        self._sha = hashlib.sha256()

    def add(self, starts: np.ndarray) -> None:
        """Append offsets (in the split), each greater than every one before."""
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size == 0:
            return
        if starts[0] <= self.last or np.any(np.diff(starts) <= 0):
            raise DataError(f"{self.path}: document offsets must increase (got {int(starts[0])} after {self.last})")
        data = starts.astype(DTYPE).tobytes()
        self._sha.update(data)
        self._f.write(data)
        self.documents += int(starts.size)
        self.last = int(starts[-1])

    def close(self, num_tokens: int) -> DocIndexHeader:
        if self.last >= num_tokens:
            raise DataError(f"{self.path}: a document starts at {self.last}, past the split's {num_tokens} tokens")
        header = DocIndexHeader(self.documents, num_tokens, self._sha.hexdigest())
        self.seal(header.pack())
        return header
