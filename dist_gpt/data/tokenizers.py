"""Tokenizers: byte, char, bpe:N / a user's tokenizer.json (HF `tokenizers`), gpt2 (tiktoken).

Each has `.encode(str) -> list[int]`, `.decode(list[int]) -> str`, `.name`, `.vocab_size`,
`.eot_id` (the end-of-text id, or None), `.spec` (a JSON description stored in the manifest) and
`.fingerprint` (sha256 of the canonical spec, or of the tokenizer file for file-based ones).
`encode_batch_np(texts)` is the fast path prepare uses: one numpy array of ids per text.

End of text: `bpe:N` adds `<|endoftext|>`; gpt2 has it (50256); a tokenizer.json uses the first of
`EOT_NAMES` in its vocabulary (or the one named with --eot). byte and char have none: their
vocabularies are exactly the bytes / the characters, and documents are simply concatenated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dist_gpt.errors import DataError

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes, vocab 256, lossless (a file's bytes are stored as they are)."""

    name = "byte"
    vocab_size = 256
    eot_id = None

    def __init__(self):
        self.spec = {"kind": "byte"}
        self.fingerprint = _sha256_json(self.spec)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_np(self, data: str | bytes) -> np.ndarray:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return np.frombuffer(raw, dtype=np.uint8)

    def encode_batch_np(self, texts: list[str | bytes]) -> list[np.ndarray]:
        return [self.encode_np(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        """Source bytes each id stands for (used to count a split's UTF-8 bytes exactly)."""
        return np.ones(256, dtype=np.int64)


class CharTokenizer:
    """One id per character; ids are the sorted characters' positions (the notebook's scheme)."""

    eot_id = None

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise DataError("char vocabulary must be a non-empty string of distinct, sorted characters")
        self.chars = chars
        self.name = "char"
        self.vocab_size = len(chars)
        self.spec = {"kind": "char", "chars": chars}
        self.fingerprint = _sha256_json(self.spec)
        self._stoi = {c: i for i, c in enumerate(chars)}
        # Lookup table over code points (at most 0x110000 entries, 4.4 MB): -1 marks "not in vocab".
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._table[codes] = np.arange(len(chars))

    def encode(self, text: str) -> list[int]:
        return self.encode_np(text).tolist()

    def lookup(self, text: str) -> np.ndarray:
        """ids for each character, -1 where the character is not in the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.full(codes.shape, -1, dtype=np.int64)
        inside = codes < self._table.size
        ids[inside] = self._table[codes[inside]]
        return ids

    def encode_np(self, text: str) -> np.ndarray:
        ids = self.lookup(text)
        if ids.size and ids.min() < 0:
            bad = text[int(np.argmax(ids < 0))]
            shown = self.chars if len(self.chars) <= 80 else self.chars[:77] + "..."
            raise DataError(f"character {bad!r} (U+{ord(bad):04X}) is not in the char vocabulary; use only its "
                            f"{len(self.chars)} characters: {shown!r}")
        return ids

    def encode_batch_np(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_np(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8", errors="surrogatepass")) for c in self.chars], dtype=np.int64)


def read_char_vocab(vocab: str | Path) -> CharTokenizer:
    """The characters of a vocabulary file as the original notebook reads its vocab.txt: the sorted set
    of its characters, read as UTF-8 text (universal newlines, so "\\r\\n" counts as "\\n"). The one
    reader for `tools.prepare --tokenizer char --vocab` and the notebook importer."""
    try:
        text = Path(vocab).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--vocab {vocab} not found: give the notebook's vocab.txt") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--vocab {vocab}: cannot read it as UTF-8 text ({e})") from None
    if not text:
        raise DataError(f"--vocab {vocab} is empty: give the notebook's vocab.txt")
    return CharTokenizer("".join(sorted(set(text))))


class HFTokenizer:
    """A HF `tokenizers` tokenizer.json: trained by `bpe:N`, or the user's own file."""

    def __init__(self, path: Path, name: str, eot_token: str | None = None):
        path = Path(path)
        try:
            raw = path.read_bytes()
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except FileNotFoundError:
            raise DataError(f"tokenizer file {path} does not exist") from None
        except Exception as e:  # the library raises its own Exception type for a bad file
            raise DataError(f"{path}: not a valid HF tokenizer.json ({e}): restore the original file") from None
        # Text that happens to contain "<|endoftext|>" is encoded as text, never as the special
        # token: only prepare's document separators are end-of-text ids.
        self._tok.encode_special_tokens = True
        self.path, self.name = path, name
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if eot_token is None:
            eot_token = next((t for t in EOT_NAMES if t in vocab), None)
        elif eot_token not in vocab:
            raise DataError(f"{path}: end-of-text token {eot_token!r} is not in the vocabulary")
        self.eot_token = eot_token
        self.eot_id = vocab[eot_token] if eot_token is not None else None
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.spec = {"kind": "hf", "name": name, "file": TOKENIZER_FILE, "eot_token": eot_token}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch_np(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def byte_lengths(self) -> np.ndarray | None:
        """Exact for byte-level tokenizers (one vocabulary character per byte); None otherwise."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            return None
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            lengths[i] = 0 if token in special else len(token)
        return lengths


class TiktokenTokenizer:
    """OpenAI's gpt2 encoding through tiktoken; needs its files cached or a network."""

    def __init__(self, encoding: str = "gpt2"):
        try:
            import tiktoken  # optional dependency: pip install 'dist_gpt[gpt2]'
        except ImportError:
            raise DataError("tokenizer gpt2 needs tiktoken (pip install 'dist_gpt[gpt2]'), or use --tokenizer bpe:N or a tokenizer.json") from None
        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as e:
            raise DataError(
                f"tokenizer {encoding}: tiktoken could not load the {encoding!r} encoding (offline? "
                f"{type(e).__name__}); use --tokenizer bpe:N (trained on your corpus) or a tokenizer.json file"
            ) from None
        self.name = encoding
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token
        self.spec = {"kind": "tiktoken", "encoding": encoding}
        self.fingerprint = _sha256_json(self.spec)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch_np(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(ids, dtype=np.int64) for ids in self._enc.encode_ordinary_batch(texts)]

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def byte_lengths(self) -> np.ndarray:
        return np.array([len(self._enc.decode_single_token_bytes(i)) if i != self.eot_id else 0
                         for i in range(self.vocab_size)], dtype=np.int64)


def check_spec_fingerprint(spec: dict, fingerprint: str, directory: Path) -> None:
    """Cheap proof that `spec` (with its file in `directory`) is the tokenizer of `fingerprint`, without
    building it: the SHA-256 of the tokenizer file, or of the canonical spec. DataError naming the file."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "hf":
        file = Path(directory) / str(spec.get("file"))
        try:
            got = hashlib.sha256(file.read_bytes()).hexdigest()
        except OSError as e:
            raise DataError(f"tokenizer file {file} cannot be read ({e.strerror}): the dataset needs it") from None
        where = str(file)
    elif kind in ("byte", "char", "tiktoken"):
        got, where = _sha256_json(spec), f"{Path(directory) / 'manifest.json'}: the tokenizer's spec"
    else:
        raise DataError(f"{Path(directory) / 'manifest.json'}: unknown tokenizer kind {kind!r}")
    if got != fingerprint:
        raise DataError(f"{where} differs from the tokenizer that made the shards (fingerprint mismatch)")


def tokenizer_from_spec(spec: dict, directory: Path | None = None):
    """Rebuild the tokenizer a manifest describes (the HF file lives in the dataset directory)."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "hf":
        if directory is None:
            raise DataError("an HF tokenizer needs its dataset directory")
        return HFTokenizer(Path(directory) / spec["file"], spec["name"], spec.get("eot_token"))
    if kind == "tiktoken":
        return TiktokenTokenizer(spec["encoding"])
    raise DataError(f"unknown tokenizer kind {kind!r} in the manifest")
