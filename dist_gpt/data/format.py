"""The token shard format: one fixed-size header, then the tokens. Documented in docs/FORMAT.md.

A shard is `HEADER_SIZE` bytes of header followed by `num_tokens` little-endian unsigned integers
of 1, 2 or 4 bytes, so `np.memmap(path, dtype, mode="r", offset=HEADER_SIZE)` reads it. The header
says everything needed to trust the payload: which tokenizer made it (fingerprint), how large its
vocabulary is (so ids can be checked), how many tokens follow (so truncation is caught by the file
size alone) and the SHA-256 of the payload (so a flipped byte is caught by `verify`).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_gpt.errors import DataError

MAGIC = b"DGPTTOK\x00"
VERSION = 1
HEADER_SIZE = 256  # bytes; a multiple of 8 keeps the payload aligned for every dtype

# magic, version, dtype code (= bytes per token), vocab size, token count,
# tokenizer fingerprint (sha256), payload checksum (sha256); then a CRC32 of those bytes.
_FIELDS = struct.Struct("<8sIIQQ32s32s")
_CRC = struct.Struct("<I")

DTYPES: dict[int, np.dtype] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
DTYPE_NAMES = {1: "uint8", 2: "uint16", 4: "uint32"}


def dtype_code_for_vocab(vocab_size: int) -> int:
    """The smallest dtype (its code = bytes per token) that holds every id < vocab_size."""
    if vocab_size < 1:
        raise DataError(f"vocabulary size {vocab_size} is not positive")
    for code in (1, 2, 4):
        if vocab_size <= 1 << (8 * code):
            return code
    raise DataError(f"vocabulary of {vocab_size} tokens does not fit uint32 (at most 4294967296)")


def check_vocab_fits(vocab_size: int, dtype_code: int, where: str) -> None:
    """Refuse a vocabulary whose largest id the dtype cannot store (silent overflow otherwise)."""
    if dtype_code not in DTYPES:
        raise DataError(f"{where}: unknown dtype code {dtype_code} (expected 1, 2 or 4)")
    if vocab_size < 1 or vocab_size > 1 << (8 * dtype_code):
        raise DataError(
            f"{where}: vocabulary of {vocab_size} tokens does not fit {DTYPE_NAMES[dtype_code]} "
            f"(at most {1 << (8 * dtype_code)}); use dtype {DTYPE_NAMES[dtype_code_for_vocab(max(vocab_size, 1))]}"
        )


@dataclass(frozen=True)
class ShardHeader:
    dtype_code: int        # bytes per token: 1, 2 or 4
    vocab_size: int        # every token id is < vocab_size
    num_tokens: int        # payload length in tokens
    tokenizer_fingerprint: str  # hex sha256 of the tokenizer's canonical spec or file
    checksum: str          # hex sha256 of the payload bytes

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.dtype_code]

    @property
    def payload_bytes(self) -> int:
        return self.num_tokens * self.dtype_code

    def pack(self) -> bytes:
        fields = _FIELDS.pack(
            MAGIC, VERSION, self.dtype_code, self.vocab_size, self.num_tokens,
            bytes.fromhex(self.tokenizer_fingerprint), bytes.fromhex(self.checksum),
        )
        head = fields + _CRC.pack(zlib.crc32(fields))
        return head + b"\x00" * (HEADER_SIZE - len(head))


def unpack_header(raw: bytes, path: Path | str) -> ShardHeader:
    """Parse and validate a header; every failure is a DataError naming the file."""
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: file is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte shard header (truncated?)")
    if raw[:8] != MAGIC:
        raise DataError(f"{path}: not a dist_gpt token shard (bad magic {raw[:8]!r})")
    fields = raw[: _FIELDS.size]
    magic, version, code, vocab, ntok, tok_fp, checksum = _FIELDS.unpack(fields)
    (crc,) = _CRC.unpack_from(raw, _FIELDS.size)
    if crc != zlib.crc32(fields) or any(raw[_FIELDS.size + _CRC.size : HEADER_SIZE]):
        raise DataError(f"{path}: shard header is corrupt (header checksum mismatch)")
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this dist_gpt reads version {VERSION}")
    check_vocab_fits(vocab, code, str(path))
    return ShardHeader(code, vocab, ntok, tok_fp.hex(), checksum.hex())


def read_head(path: Path, what: str) -> tuple[bytes, int]:
    """A file's first HEADER_SIZE bytes (fewer if it is shorter) and its size; a DataError naming
    the file and `what` it is when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(HEADER_SIZE), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} ({e.strerror})") from None


def read_header(path: Path | str) -> ShardHeader:
    """Read a shard's header and check the file size against its token count (cheap: no hashing)."""
    path = Path(path)
    raw, size = read_head(path, "shard file")
    header = unpack_header(raw, path)
    expected = HEADER_SIZE + header.payload_bytes
    if size != expected:
        raise DataError(f"{path}: file is {size} bytes but its header promises {expected} (truncated or appended to)")
    return header


def iter_payload(path: Path | str, header: ShardHeader, chunk_tokens: int = 1 << 22, start: int = 0, stop: int | None = None):
    """Yield tokens [start, stop) as numpy arrays of at most chunk_tokens tokens (bounded memory)."""
    stop = header.num_tokens if stop is None else stop
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE + start * header.dtype_code)
        left = stop - start
        while left > 0:
            n = min(left, chunk_tokens)
            raw = f.read(n * header.dtype_code)
            if len(raw) != n * header.dtype_code:
                raise DataError(f"{path}: payload ends early (truncated)")
            yield np.frombuffer(raw, dtype=header.dtype)
            left -= n


def verify_payload(path: Path | str, header: ShardHeader, progress=None) -> None:
    """Full check: payload checksum and every token id < vocab_size. Reads the whole shard;
    `progress(nbytes)` is called after each chunk."""
    sha = hashlib.sha256()
    limit = 1 << (8 * header.dtype_code)
    for chunk in iter_payload(path, header):
        sha.update(chunk)
        if progress is not None:
            progress(chunk.nbytes)
        if header.vocab_size < limit and chunk.size and int(chunk.max()) >= header.vocab_size:
            bad = int(np.argmax(chunk >= header.vocab_size))
            raise DataError(f"{path}: token id {int(chunk[bad])} is >= the vocabulary size {header.vocab_size}")
    if sha.hexdigest() != header.checksum:
        raise DataError(f"{path}: payload checksum mismatch (the file is corrupt)")


def truncate_shard(path: Path | str, header: ShardHeader, keep: int) -> ShardHeader:
    """Cut a shard to its first `keep` tokens (prepare's single-document split, in its staging dir)."""
    sha = hashlib.sha256()
    for chunk in iter_payload(path, header, stop=keep):
        sha.update(chunk)
    new = ShardHeader(header.dtype_code, header.vocab_size, keep, header.tokenizer_fingerprint, sha.hexdigest())
    with open(path, "r+b") as f:
        f.write(new.pack())
        f.truncate(HEADER_SIZE + keep * header.dtype_code)
        f.flush()
        os.fsync(f.fileno())
    return new


class StagedFile:
    """A file written under `<name>.tmp` behind a zeroed header placeholder: `seal` writes the
    header last, syncs and renames it into place, so the final name only ever holds a complete,
    checksummed file; an interrupted run leaves at most a `.tmp` file, which `abort` removes."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self.tmp_path, "wb")
        self._f.write(b"\x00" * HEADER_SIZE)

    def seal(self, header: bytes) -> None:
        self._f.seek(0)
        self._f.write(header)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        """Drop the partial file (called on errors and interrupts)."""
        if not self._f.closed:
            self._f.close()
        self.tmp_path.unlink(missing_ok=True)


class ShardWriter(StagedFile):
    """Writes one shard under `<name>.tmp`, then renames it into place when complete (StagedFile)."""

    def __init__(self, path: Path | str, dtype_code: int, vocab_size: int, tokenizer_fingerprint: str):
        check_vocab_fits(vocab_size, dtype_code, str(path))
        super().__init__(path)
        self.dtype_code, self.vocab_size, self.fingerprint = dtype_code, vocab_size, tokenizer_fingerprint
        self.dtype = DTYPES[dtype_code]
        self.num_tokens = 0
        self._sha = hashlib.sha256()

    def write(self, tokens: np.ndarray) -> None:
        """Append token ids; ids are checked against the vocabulary (never silently truncated)."""
        if tokens.size == 0:
            return
        if tokens.dtype != self.dtype:
            if int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0:
                raise DataError(f"{self.path}: token id out of range for vocabulary of {self.vocab_size}")
            tokens = tokens.astype(self.dtype)
        elif self.vocab_size < 1 << (8 * self.dtype_code) and int(tokens.max()) >= self.vocab_size:
            raise DataError(f"{self.path}: token id {int(tokens.max())} >= vocabulary size {self.vocab_size}")
        data = np.ascontiguousarray(tokens).data
        self._sha.update(data)
        self._f.write(data)
        self.num_tokens += tokens.size

    def close(self) -> ShardHeader:
        header = ShardHeader(self.dtype_code, self.vocab_size, self.num_tokens, self.fingerprint, self._sha.hexdigest())
        self.seal(header.pack())
        return header
