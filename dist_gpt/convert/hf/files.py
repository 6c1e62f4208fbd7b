"""A Hugging Face model directory on disk: `config.json` and safetensors weights, read and written.

Only safetensors are read: the format is a JSON header and raw tensor bytes, so reading one runs no
code. A pickled `pytorch_model.bin` could run anything when loaded and is refused with the one
command that converts it. Weights may be one `model.safetensors` or shards listed by
`model.safetensors.index.json` (its `weight_map`: tensor name -> shard file).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dist_gpt.errors import CheckpointError, ConfigError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
EMBEDDED = "dist_gpt"  # the key of config.json that holds dist_gpt's own settings
# Under EMBEDDED: {file name: CRC32 of its bytes} of the weights an export wrote (format 2 on);
# transformers ignores config keys it does not know, so the file stays a plain HF directory.
WEIGHTS_CRC32 = "weights_crc32"


def read_config(directory: Path) -> dict | None:
    """The Hugging Face config of `directory`, or None when it is not a Hugging Face model directory
    (no config.json, or a dist_gpt run directory's config.json, which has no `model_type`)."""
    file = Path(directory) / CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not readable JSON ({e}): restore the model directory") from None
    return config if isinstance(config, dict) and "model_type" in config else None


def config_int(hf: dict, key: str, where: str) -> int:
    """An integer key of an HF config.json, or a CheckpointError naming it."""
    if not isinstance(hf.get(key), int):
        raise CheckpointError(f"{where}: {key} is missing or not an integer: not a complete {hf.get('model_type')} "
                              "config.json")
    return hf[key]


def is_model_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and read_config(Path(path)) is not None


def require_config(directory: str | Path) -> None:
    """A directory with Hugging Face weights but no config.json: a CheckpointError naming the missing file
    (without it the directory would be taken for a dist_gpt run, and refused for the wrong reason)."""
    directory = Path(directory)
    weights = [name for name in (WEIGHTS, INDEX, *PICKLED) if (directory / name).is_file()]
    if weights == [WEIGHTS] and _is_single_file_export(directory / WEIGHTS):
        return  # dist_gpt's own one-file export that happens to be named model.safetensors: not an HF directory
    if directory.is_dir() and not (directory / CONFIG).exists() and weights:
        raise CheckpointError(f"{directory / CONFIG} is missing: {directory} holds Hugging Face weights but not the "
                              "config.json that describes them; copy the model's config.json into it")


def _is_single_file_export(file: Path) -> bool:
    """Whether a .safetensors file's header says dist_gpt.export wrote it (format safetensors)."""
    try:
        with open(file, "rb") as f:
            header = json.loads(f.read(min(int.from_bytes(f.read(8), "little"), 100 << 20)))
        return "dist_gpt.format" in (header.get("__metadata__") or {})
    except (OSError, ValueError, AttributeError):
        return False


def file_crc32(file: Path) -> int:
    """CRC32 of a file's bytes, read 16 MiB at a time."""
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def check_weights(directory: Path, hf: dict) -> None:
    """The weights of a directory dist_gpt exported (format 2 on) against the CRC32s its config.json
    records; a CheckpointError naming the damaged file. Other directories carry nothing to check."""
    embedded = hf.get(EMBEDDED)
    if not isinstance(embedded, dict) or str(embedded.get("format", "1")) == "1":
        return  # not written by dist_gpt, or by a dist_gpt before the checksums
    recorded = embedded.get(WEIGHTS_CRC32)
    if not isinstance(recorded, dict) or not recorded:
        raise CheckpointError(f"{directory / CONFIG} is damaged: its \"{EMBEDDED}\" entry has no {WEIGHTS_CRC32}: "
                              "export the model again")
    for name, crc in sorted(recorded.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: export the model again")
        if file_crc32(file) != crc:
            raise CheckpointError(f"{file} is damaged: its bytes do not match the CRC32 recorded in {CONFIG} at "
                                  "export; export the model again")


class WeightFiles:
    """The safetensors tensors of a model directory, read one at a time (never all at once)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        single, index = self.directory / WEIGHTS, self.directory / INDEX
        if single.is_file():
            with self._open(single) as f:
                self.files = {name: single for name in f.keys()}
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {name: self.directory / shard for name, shard in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}): restore the model "
                                      "directory") from None
            for shard in sorted(set(self.files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{shard} is missing (listed in {index.name}): download or copy "
                                          "every shard of the model")
        else:
            pickled = [name for name in PICKLED if (self.directory / name).exists()]
            if pickled:
                d = str(self.directory)
                raise CheckpointError(
                    f"{self.directory / pickled[0]} is a pickle (loading it can run code); dist_gpt reads only "
                    f"safetensors: convert it once with python -c \"from transformers import AutoModelForCausalLM "
                    f"as M; M.from_pretrained('{d}').save_pretrained('{d}')\"")
            raise CheckpointError(f"{self.directory} has no {WEIGHTS} or {INDEX}: copy the model's safetensors "
                                  "weights into it")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}): download it again") from None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e}): download it again") from None


def write_model_dir(out: Path, config: dict, tensors: dict[str, torch.Tensor], files: dict[str, str],
                    force: bool) -> list[Path]:
    """Write config.json, model.safetensors and `files` (name -> text) into the directory `out`.

    Everything is written into a temporary directory beside `out` first and moved in when complete,
    so a crash leaves no half-written model. An existing `out` that is not empty is refused unless
    `force`, and then only the files named here are replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: --format hf writes a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} already exists and is not empty: choose another --out or pass --force to "
                          "replace the model files in it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / WEIGHTS),
                  metadata={"format": "pt"})
        if isinstance(config.get(EMBEDDED), dict):  # dist_gpt's export: record what check_weights verifies
            config = config | {EMBEDDED: config[EMBEDDED] | {WEIGHTS_CRC32: {WEIGHTS: file_crc32(staging / WEIGHTS)}}}
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, text in files.items():
            (staging / name).write_bytes(text.encode("utf-8"))  # bytes: no newline translation
        written = sorted(p.name for p in staging.iterdir())
        if not out.exists():
            os.replace(staging, out)
        else:
            for name in written:
                os.replace(staging / name, out / name)
            (out / INDEX).unlink(missing_ok=True)  # an older sharded save must not shadow the new file
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in written]
