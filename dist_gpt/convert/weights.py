"""A model's weights, GPTConfig and tokenizer from a run, a checkpoint, an export or a Hugging Face directory.

    loaded = load_weights("runs/cpu")                              # the run's latest checkpoint
    loaded = load_weights("runs/cpu", which="best")                # its best by validation loss
    loaded = load_weights("runs/cpu/checkpoints/step_0001000")     # one checkpoint
    loaded = load_weights("model.safetensors")                     # an export (python -m dist_gpt.export)
    loaded = load_weights("models/gpt2")                           # a Hugging Face directory (dist_gpt.convert.hf)
    model = GPT(loaded.config); model.load_state_dict(loaded.state_dict)
    loaded.tokenizer.decode(ids)                                   # loaded on first use

A checkpoint is read through the safe reader (no pickle beyond DCP's metadata classes), and only
the model's tensors are read: the optimizer state stays on disk. An export is read with
safetensors, whose format holds raw tensors and a string table only, and checked against the
CRC32 recorded at export. A Hugging Face model directory (config.json + safetensors weights) is
converted by `dist_gpt.convert.hf`, with its tokenizer.json as the tokenizer.
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dist_gpt.checkpoint.layout import checkpoint_option, read_manifest, read_meta
from dist_gpt.checkpoint.loading import load_tensors
from dist_gpt.checkpoint.retention import resolve_checkpoint
from dist_gpt.checkpoint.run_state import MODEL_KEYS_FREE
from dist_gpt.checkpoint.safe_reader import read_metadata, reading_progress
from dist_gpt.data.manifest import MANIFEST, load_manifest
from dist_gpt.data.tokenizers import TOKENIZER_FILE, tokenizer_from_spec
from dist_gpt.errors import CheckpointError, ConfigError, DataError
from dist_gpt.model.gpt import GPT, GPTConfig
from dist_gpt.progress import progress_bar

from .hf.convert import EMBEDDED, gpt_config, init_model_config, init_state_dict, read_model
from .hf.files import is_model_dir, require_config

# Keys of the string table of an exported .safetensors file.
KEY_FORMAT = "dist_gpt.format"
KEY_CONFIG = "dist_gpt.model_config"
KEY_DATASET = "dist_gpt.dataset"
KEY_TOKENIZER_SPEC = "dist_gpt.tokenizer_spec"
KEY_TOKENIZER_JSON = "dist_gpt.tokenizer_json"
KEY_TOKENIZER_FILE = "dist_gpt.tokenizer_file"
KEY_STEP = "dist_gpt.step"
KEY_VAL_LOSS = "dist_gpt.val_loss"
KEY_SOURCE = "dist_gpt.source"
KEY_CRC32 = "dist_gpt.crc32"
KEY_HEADER_CRC32 = "dist_gpt.header_crc32"
EXPORT_FORMAT = "2"  # 2 adds KEY_HEADER_CRC32 (of the string table and the tensor index); "1" is still read


@dataclass
class LoadedWeights:
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    source: Path                      # the checkpoint directory or .safetensors file read
    step: int | None
    val_loss: float | None
    dataset: dict[str, Any]           # path, fingerprint, tokenizer_fingerprint, tokenizer, vocab_size, eot_id
    tokenizer_spec: dict | None = None
    tokenizer_json: str | None = None  # the HF tokenizer.json text carried by an export
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def eot_id(self) -> int | None:
        return self.dataset.get("eot_id")

    @property
    def data_path(self) -> str | None:
        return self.dataset.get("path")

    @property
    def tokenizer(self):
        """The tokenizer the model was trained with, verified by its fingerprint (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = _build_tokenizer(self)
        return self._tokenizer


def add_source_arguments(parser, verb: str) -> None:
    """--run/--checkpoint/--model: where a command line (sample, evaluate) takes its model from; --quiet."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", "--run-dir", dest="run", help=f"run directory: {verb} its latest checkpoint")
    src.add_argument("--checkpoint", help="a checkpoint directory (runs/NAME/checkpoints/step_...)")
    src.add_argument("--model", help="an exported .safetensors file or a Hugging Face model directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model(args, device: torch.device):
    """(GPT, LoadedWeights): the model named by `add_source_arguments`' flags, on `device`."""
    loaded = load_weights(args.run or args.checkpoint or args.model, device="cpu", option="--checkpoint",
                          quiet=args.quiet)
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict)
    return model.to(device), loaded


def init_from(source: str | Path, model) -> None:
    """train.init_from: load the weights of a run, checkpoint, export or Hugging Face directory into
    `model` (nanoGPT's init_from; the optimizer and the step start fresh). The source's model settings
    must match `model.cfg` (for a Hugging Face directory they are where `model.cfg` came from)."""
    if is_model_dir(source):  # a Hugging Face directory: model.cfg came from its config.json (runinfo)
        model.load_state_dict(init_state_dict(str(source), model.cfg), strict=True)
        return
    loaded = load_weights(source, device="cpu")
    theirs, ours = asdict(loaded.config), asdict(model.cfg)
    diff = [k for k, v in theirs.items() if k not in MODEL_KEYS_FREE and ours.get(k) != v]
    if diff:
        what = ", ".join(f"--model.{k}={theirs[k]}" for k in diff)
        raise ConfigError(f"--init-from {source} holds a model with other settings: pass {what}")
    model.load_state_dict(loaded.state_dict, strict=True)


@dataclass
class InitFrom:
    """train.init_from as the trainer uses it (dist_gpt.training.trainer.build(init=...)): the source's
    model section, then its weights. The train command makes it, so the trainer never imports the
    conversions."""

    source: str
    unchecked_ids: bool = False  # train.init_from_unchecked_ids: a directory without a tokenizer is taken anyway

    def model_config(self, model_cfg: GPTConfig, data) -> GPTConfig:
        """A Hugging Face directory gives the model section (init_model_config); any other source keeps it."""
        return init_model_config(model_cfg, self.source, data, self.unchecked_ids)

    def load_into(self, model) -> None:
        init_from(self.source, model)


def tensors_crc32(tensors: dict[str, torch.Tensor]) -> int:
    """CRC32 over every tensor's bytes in sorted key order (what an export records and a load checks)."""
    crc = 0
    for key in sorted(tensors):
        flat = tensors[key].detach().cpu().contiguous().reshape(-1)  # (numel,) so a 0-d tensor can be viewed as bytes
        crc = zlib.crc32(flat.view(torch.uint8).numpy() if flat.numel() else b"", crc)
    return crc


def load_weights(path: str | Path, device: str | torch.device = "cpu", which: str = "latest",
                 option: str | None = None, quiet: bool = True) -> LoadedWeights:
    """Weights and settings from a run directory (`which`: latest | best), a checkpoint or a .safetensors.
    `option`: the command's option that names the checkpoint, for the way out its errors offer;
    quiet=False shows a progress bar of the bytes read (a command's, see dist_gpt.progress)."""
    path = Path(path)
    require_config(path)
    if path.suffix == ".safetensors" or path.is_file():
        loaded = _from_safetensors(path, quiet)
    elif is_model_dir(path):
        loaded = _from_hf_dir(path)
    else:
        with checkpoint_option(option):
            loaded = _from_checkpoint(resolve_checkpoint(path, which), quiet)
    loaded.state_dict = {k: v.to(device) for k, v in loaded.state_dict.items()}
    return loaded


def model_prefix(keys) -> str:
    """The DCP key prefix of the model's tensors: `<state name>.model.` of the one ModelOptimizerState."""
    names = sorted({k.split(".", 2)[0] for k in keys if k.count(".") >= 2 and k.split(".", 2)[1] == "model"})
    if len(names) != 1:
        raise CheckpointError(f"expected one model in the checkpoint, found {len(names)} ({', '.join(names)})")
    return f"{names[0]}.model."


def _from_checkpoint(ckpt: Path, quiet: bool = True) -> LoadedWeights:
    manifest = read_manifest(ckpt)
    meta = read_meta(ckpt, manifest)
    md = read_metadata(ckpt, manifest)
    prefix = model_prefix(md.state_dict_metadata)
    # Templates shaped from the metadata: only the model's tensors are read, never the optimizer's.
    model = {k[len(prefix):]: torch.empty(tuple(e.size), dtype=e.properties.dtype)
             for k, e in md.state_dict_metadata.items() if k.startswith(prefix)}
    state: dict[str, Any] = {prefix.split(".")[0]: {"model": model}}
    size = sum(info.length for index, info in md.storage_data.items() if index.fqn.startswith(prefix))
    with progress_bar(size, f"loading {ckpt.name}", unit="B", quiet=quiet) as bar, reading_progress(bar.update):
        load_tensors(ckpt, manifest, state, strict_prefixes=(prefix,), no_dist=True, metadata=md)
    config = gpt_config(meta.get("config", {}).get("model"), ckpt / "meta.json")
    dataset = meta.get("dataset") or {}
    return LoadedWeights(config, model, ckpt, meta.get("step", manifest.get("step")), manifest.get("val_loss"),
                         dataset, tokenizer_spec=dataset.get("tokenizer_spec"))


def _from_safetensors(file: Path, quiet: bool = True) -> LoadedWeights:
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: pass an exported .safetensors file "
                              "(python -m dist_gpt.export), a run directory or a checkpoint directory")
    try:
        with safe_open(str(file), framework="pt") as f, \
                progress_bar(_tensor_bytes(file), f"loading {file.name}", unit="B", quiet=quiet) as bar:
            info = f.metadata() or {}
            tensors = {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
                bar.update(tensors[k].numel() * tensors[k].element_size())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable .safetensors file ({e}): export it again") from None
    if info.get(KEY_FORMAT) not in ("1", EXPORT_FORMAT):
        raise CheckpointError(f"{file} was not exported by this dist_gpt (its {KEY_FORMAT} is {info.get(KEY_FORMAT)!r}; "
                              "this dist_gpt reads 1 and 2): export it with python -m dist_gpt.export")
    if info[KEY_FORMAT] != "1" and info.get(KEY_HEADER_CRC32) != str(header_crc32(info, tensors)):
        raise CheckpointError(f"{file} is corrupt: its metadata or tensor index does not match the CRC32 recorded "
                              "at export; export it again")
    if KEY_CRC32 in info and str(tensors_crc32(tensors)) != info[KEY_CRC32]:
        raise CheckpointError(f"{file} is corrupt: its tensors do not match the CRC32 recorded at export; "
                              "export it again")
    try:
        raw_config = json.loads(info[KEY_CONFIG])
        dataset = json.loads(info.get(KEY_DATASET, "{}"))
        spec = json.loads(info[KEY_TOKENIZER_SPEC]) if KEY_TOKENIZER_SPEC in info else None
        step = int(info[KEY_STEP]) if info.get(KEY_STEP, "").isdigit() else None
        val = float(info[KEY_VAL_LOSS]) if info.get(KEY_VAL_LOSS) else None
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{file} has a damaged dist_gpt metadata table ({e}): export it again") from None
    tok_json = info.get(KEY_TOKENIZER_JSON)
    beside = info.get(KEY_TOKENIZER_FILE)
    if tok_json is None and beside and (file.parent / beside).is_file():
        tok_json = read_tokenizer_text(file.parent / beside, "export the model again")
    return LoadedWeights(gpt_config(raw_config, file), tensors, file, step,
                         val if val is not None and math.isfinite(val) else None, dataset, spec, tok_json)


def _from_hf_dir(directory: Path) -> LoadedWeights:
    """A Hugging Face model directory; one exported by dist_gpt carries its own settings in config.json."""
    config, state, hf = read_model(directory)
    info = hf.get(EMBEDDED) or {}
    eos = hf.get("eos_token_id")
    dataset = info.get("dataset") or {"eot_id": eos if isinstance(eos, int) else None}
    spec, text = info.get("tokenizer_spec"), None
    tok_file = directory / TOKENIZER_FILE
    if (spec is None or spec.get("kind") == "hf") and tok_file.is_file():
        text = read_tokenizer_text(tok_file, "restore the model directory's original file")
        spec = spec or {"kind": "hf", "name": f"{directory.name}/{TOKENIZER_FILE}", "file": TOKENIZER_FILE,
                        "eot_token": None}
    return LoadedWeights(config, state, directory, info.get("step"), info.get("val_loss"), dataset, spec, text)


def _tensor_bytes(file: Path) -> int:
    """Bytes of tensor data in a .safetensors file: all of it after the 8-byte length and the header."""
    with open(file, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return max(0, file.stat().st_size - 8 - header)


def header_crc32(info: dict[str, str], tensors: dict[str, torch.Tensor]) -> int:
    """CRC32 of an export's string table (without KEY_HEADER_CRC32) and of its tensors' names, dtypes and
    shapes: damage there is caught even where safetensors still parses it."""
    table = {k: v for k, v in info.items() if k != KEY_HEADER_CRC32}
    index = {k: [str(t.dtype), list(t.shape)] for k, t in tensors.items()}
    return zlib.crc32(json.dumps([table, index], sort_keys=True, separators=(",", ":")).encode())


def dataset_tokenizer(data_path: str | None, spec: dict | None = None) -> tuple[dict | None, str | None]:
    """(spec, tokenizer.json text or None) of a dataset directory, the spec from its manifest unless given:
    (None, None) when the dataset is gone; a DataError naming the file when what is there is damaged."""
    if not data_path or not Path(data_path).is_dir():
        return None, None
    if spec is None:
        if not (Path(data_path) / MANIFEST).is_file():
            return None, None
        spec = load_manifest(Path(data_path), "restore the dataset the model was trained on")["tokenizer"]["spec"]
    if not isinstance(spec, dict) or spec.get("kind") != "hf":
        return spec, None
    file = Path(data_path) / str(spec.get("file"))
    if not file.exists():
        return spec, None
    return spec, read_tokenizer_text(file, "restore the dataset's original file")


def read_tokenizer_text(file: Path, fix: str) -> str:
    """The text of a tokenizer.json, or a DataError naming the file and `fix` when it cannot be read or
    is not UTF-8 (a bit flip is enough)."""
    try:
        # Bytes, not read_text(): newline translation would change the file's sha256 fingerprint.
        return file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer file {file} cannot be read ({e}): {fix}") from None


def _build_tokenizer(w: LoadedWeights):
    spec, text, origin = w.tokenizer_spec, w.tokenizer_json, w.source  # origin: what carries the tokenizer
    if spec is None or (text is None and spec.get("kind") == "hf"):  # a checkpoint: the dataset has the file
        spec, text = dataset_tokenizer(w.data_path, spec)
        origin = Path(w.data_path or ".") / (spec.get("file") or "manifest.json") if isinstance(spec, dict) else None
    if spec is None:
        raise DataError(f"the tokenizer of {w.source} is not available: its dataset {w.data_path} (manifest.json) "
                        "is gone; restore the dataset there or export the model while it exists")
    if spec.get("kind") == "hf":
        if text is None:
            raise DataError(f"tokenizer file {origin} of {w.source} is missing: restore the dataset or export "
                            "the model while it exists")
        with tempfile.TemporaryDirectory() as tmp:  # HFTokenizer parses the file into memory
            (Path(tmp) / spec["file"]).write_bytes(text.encode("utf-8"))
            try:
                tok = tokenizer_from_spec(spec, Path(tmp))
            except DataError:
                raise DataError(f"{origin} does not hold a valid tokenizer.json (damaged?): restore the dataset's "
                                "original file, or export the model again") from None
    else:
        tok = tokenizer_from_spec(spec, Path(w.data_path) if w.data_path else None)
    expect = w.dataset.get("tokenizer_fingerprint")
    if expect and tok.fingerprint != expect:
        raise DataError(f"{origin} is not the tokenizer {w.source} was trained with (fingerprint "
                        f"{tok.fingerprint[:12]} != {expect[:12]}): restore the dataset's original tokenizer file, "
                        "or use the original dataset")
    return tok
