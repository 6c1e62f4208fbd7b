"""dist_gpt's tokenizers written as a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`).

`AutoTokenizer.from_pretrained(DIR)` then encodes (with `add_special_tokens=False`, as dist_gpt
does) and decodes every text as the dataset's tokenizer does:

    byte      a byte-level BPE with no merges: id = the byte (bytes shown as GPT-2's printable stand-ins)
    char      a BPE with no merges over the sorted characters: id = the character's position;
              the Fuse decoder joins them back without spaces. A character outside the vocabulary is
              an error in dist_gpt and is dropped by the HF tokenizer.
    bpe:N     the dataset's tokenizer.json, byte for byte (so is a user's tokenizer.json)
    gpt2      tiktoken's encoding converted to GPT-2's HF tokenizer (vocab.json + merges.txt as one
              tokenizer.json): needs tiktoken's files for "gpt2" on this machine (its cache)

A tokenizer without end-of-text (byte, char) declares a bos token all the same, one whose text
encodes to its own id (`prefix_token`): lm-eval's `hf` model cannot score a model without one.

One difference for tokenizer.json tokenizers: dist_gpt encodes the text "<|endoftext|>" as text,
while an HF tokenizer encodes it as the special token. Prepared datasets never contain it as text
unless the corpus did.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from dist_gpt.data.tokenizers import TiktokenTokenizer
from dist_gpt.errors import ConfigError, DataError

GPT2_PATTERN_TIKTOKEN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character of each byte (the table of its byte-level BPE files):
    printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def byte_tokenizer_json() -> str:
    table = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def char_tokenizer_json(chars: str) -> str:
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def tiktoken_tokenizer_json(encoding) -> str:
    """A tiktoken Encoding with GPT-2's split pattern as GPT-2's HF tokenizer. tiktoken keeps
    only ranks (token bytes -> id); BPE's merges are recovered by re-running BPE on each token with
    the lower ranks: the last merge that builds it is its pair (transformers' TikTokenConverter)."""
    if encoding._pat_str not in (GPT2_PATTERN_TIKTOKEN, GPT2_PATTERN):
        raise ConfigError(f"tokenizer {encoding.name}: only GPT-2's split pattern has a byte-level HF equivalent")
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _last_merge(ranks, token, rank)
            merges.append((text(left), text(right)))
    tok = Tokenizer(models.BPE(vocab={text(t): r for t, r in ranks.items()}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True) for t, _ in
                            sorted(encoding._special_tokens.items(), key=lambda kv: kv[1])])
    return tok.to_str()


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        _, i = min((r, i) for r, i in pairs if r is not None and r < rank)  # the earliest merge applies first
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def tokenizer_files(spec: dict, tokenizer_json: str | None, eot_id: int | None, block_size: int) -> dict[str, str]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} for the tokenizer `spec` describes."""
    kind = spec.get("kind")
    eot_token = None
    if kind == "byte":
        text = byte_tokenizer_json()
    elif kind == "char":
        text = char_tokenizer_json(spec["chars"])
    elif kind == "hf":
        if tokenizer_json is None:
            raise ConfigError("the model's tokenizer.json is not available (its dataset is gone and the source "
                              "does not carry it): restore the dataset to export a tokenizer")
        text, eot_token = tokenizer_json, spec.get("eot_token")
    elif kind == "tiktoken":
        text, eot_token = _tiktoken_json(spec["encoding"]), "<|endoftext|>"
    else:
        raise ConfigError(f"tokenizer kind {kind!r} cannot be exported as a Hugging Face tokenizer")
    if eot_token is None and eot_id is not None:  # a tokenizer.json whose end-of-text dist_gpt detected
        eot_token = _token_of(text, eot_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    if eot_token is not None:
        config |= {"bos_token": eot_token, "eos_token": eot_token}
    elif (prefix := prefix_token(spec, text)) is not None:
        config |= {"bos_token": prefix}  # never eos: lm-eval would stop generations at it
    return {"tokenizer.json": text, "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}


def prefix_token(spec: dict, tokenizer_json: str) -> str | None:
    """The token declared as bos for a tokenizer without end-of-text, so that lm-eval's `hf` model,
    which needs a bos or eos id (its `prefix_token_id`), can score the export.

    lm-eval conditions on that id only where a context is empty (and before the first window of
    `loglikelihood_rolling`); dist_gpt's own scorer refuses an empty context without end-of-text, so
    no score it computes depends on the choice. transformers makes a declared bos a special added
    token, matched in raw text before the model's own splitting; so the token chosen is one whose
    text already encodes to exactly its id, and encoding stays as dist_gpt's:
    byte: "~" (id 126, the highest byte that is one printable character of its own); char: the
    vocabulary's last character (the highest code point); a tokenizer.json: its first special added
    token (already special, so declaring it changes nothing), or None when it has none."""
    kind = spec.get("kind")
    if kind == "byte":
        return "~"
    if kind == "char":
        return spec["chars"][-1] if spec.get("chars") else None
    added = json.loads(tokenizer_json).get("added_tokens") or []
    return next((t.get("content") for t in added if t.get("special") and t.get("content")), None)


def _token_of(tokenizer_json: str, token_id: int) -> str | None:
    """The text of `token_id` in a tokenizer.json: an added (special) token, or one of the model's vocabulary."""
    tree = json.loads(tokenizer_json)
    added = {t.get("id"): t.get("content") for t in tree.get("added_tokens") or []}
    vocab = (tree.get("model") or {}).get("vocab")
    if token_id not in added and isinstance(vocab, dict):
        added = {i: t for t, i in vocab.items()}
    return added.get(token_id)


def _tiktoken_json(name: str) -> str:
    try:
        encoding = TiktokenTokenizer(name)._enc
    except DataError as e:
        raise ConfigError(f"the {name} tokenizer's files are not on this machine, so it cannot be written as "
                          f"GPT-2's Hugging Face tokenizer ({str(e).split(';')[0]}); run the export where "
                          "tiktoken can load it (TIKTOKEN_CACHE_DIR) or copy GPT-2's tokenizer.json into "
                          "the export") from None
    return tiktoken_tokenizer_json(encoding)
