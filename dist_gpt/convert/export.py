"""A model's weights as one .safetensors file (this module) or a Hugging Face model directory
(hf/export.py): `export(checkpoint, out, ...)`, the function behind `python -m dist_gpt.export`.

The file holds the model's tensors only (no optimizer state) and, in its string table, the
GPTConfig, the dataset's identity, the tokenizer's spec and, for a tokenizer.json tokenizer, the
file's text; that file is also written beside the export as `<name>.tokenizer.json`. Read it back
with `python -m dist_gpt.sample --model model.safetensors` or `dist_gpt.convert.weights.load_weights`.
An existing output is never overwritten unless `force`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from dist_gpt.errors import ConfigError

from .hf.export import write_export
from .weights import (
    EXPORT_FORMAT,
    KEY_CONFIG,
    KEY_CRC32,
    KEY_DATASET,
    KEY_FORMAT,
    KEY_HEADER_CRC32,
    KEY_SOURCE,
    KEY_STEP,
    KEY_TOKENIZER_FILE,
    KEY_TOKENIZER_JSON,
    KEY_TOKENIZER_SPEC,
    KEY_VAL_LOSS,
    dataset_tokenizer,
    header_crc32,
    load_weights,
    tensors_crc32,
)


def export(checkpoint: str | Path, out: str | Path, which: str = "latest", force: bool = False,
           fmt: str = "safetensors", quiet: bool = True) -> list[Path]:
    """Write the export (and the tokenizer file beside it when there is one); return the files written."""
    out = Path(out)
    if fmt == "safetensors" and out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the file name must end in .safetensors")
    loaded = load_weights(checkpoint, which=which, option="--checkpoint", quiet=quiet)
    spec, tok_json = export_tokenizer(loaded)
    if fmt == "hf":
        written = write_export(loaded, spec, tok_json, out, force)
        print(f"exported {loaded.source} (step {loaded.step}) as a Hugging Face model directory {out} "
              f"({', '.join(p.name for p in written)})")
        return written
    return _export_safetensors(loaded, spec, tok_json, out, force)


def export_tokenizer(loaded) -> tuple[dict | None, str | None]:
    """(spec, tokenizer.json text or None) of the model's tokenizer, from its dataset or else from
    what the source carries (an export, a Hugging Face directory), verified against the fingerprint
    it was trained with. A note says so when neither has it (the spec, if known, is still recorded)."""
    spec, tok_json = dataset_tokenizer(loaded.data_path, loaded.tokenizer_spec)
    if tok_json is None and loaded.tokenizer_json is not None:
        tok_json = loaded.tokenizer_json
    spec = spec or loaded.tokenizer_spec
    gone = not (loaded.data_path and Path(loaded.data_path).is_dir())
    if spec is None or (spec.get("kind") == "hf" and tok_json is None and gone):
        print(f"note: dataset {loaded.data_path} not found: the export names its tokenizer "
              f"({loaded.dataset.get('tokenizer')}) but cannot carry it", file=sys.stderr)
    elif spec.get("kind") != "tiktoken":  # tiktoken may need a download; the others are checked here
        _ = loaded.tokenizer  # a DataError naming the file if it is missing, damaged or not the one trained with
        loaded.tokenizer_spec, loaded.tokenizer_json = spec, tok_json
    return spec, tok_json


def _export_safetensors(loaded, spec: dict | None, tok_json: str | None, out: Path, force: bool) -> list[Path]:
    tok_out = out.with_name(out.stem + ".tokenizer.json")
    written = [out] + ([tok_out] if tok_json is not None else [])
    for f in written:
        if f.exists() and not force:
            raise ConfigError(f"{f} already exists: choose another --out or pass --force to overwrite it")
    info = {
        "format": "pt",
        KEY_FORMAT: EXPORT_FORMAT,
        KEY_CONFIG: json.dumps(asdict(loaded.config), sort_keys=True),
        KEY_DATASET: json.dumps(loaded.dataset, sort_keys=True),
        KEY_SOURCE: str(loaded.source),
        KEY_STEP: "" if loaded.step is None else str(loaded.step),
        KEY_VAL_LOSS: "" if loaded.val_loss is None else repr(loaded.val_loss),
        KEY_CRC32: str(tensors_crc32(loaded.state_dict)),
    }
    if spec is not None:
        info[KEY_TOKENIZER_SPEC] = json.dumps(spec, sort_keys=True)
    if tok_json is not None:
        info[KEY_TOKENIZER_JSON] = tok_json
        info[KEY_TOKENIZER_FILE] = tok_out.name
    tensors = {k: v.contiguous() for k, v in loaded.state_dict.items()}
    info[KEY_HEADER_CRC32] = str(header_crc32(info, tensors))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    os.replace(tmp, out)
    if tok_json is not None:
        tok_out.write_bytes(tok_json.encode("utf-8"))  # the exact bytes: the fingerprint is their sha256
    n = sum(t.numel() for t in loaded.state_dict.values())
    print(f"exported {loaded.source} (step {loaded.step}, {n:,} parameters) to {out}"
          + (f" and {tok_out.name}" if tok_json is not None else ""))
    return written
