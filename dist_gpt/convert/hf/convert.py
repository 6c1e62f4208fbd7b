"""Pure conversions between a Hugging Face model directory and dist_gpt's (GPTConfig, state dict).

Import: `config.json` names the architecture (`model_type`); its module turns the config into a
GPTConfig and lists the tensor links. A directory written by dist_gpt's export also carries
dist_gpt's own model settings under the `"dist_gpt"` key of config.json: those win (they say, for
example, ReLU² where the HF config can only say "gated ReLU"), after a check that they describe the
same network as the HF keys beside them (initialisation-only keys and biases aside: the links check
that a bias dist_gpt lacks is zero in the file).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from dist_gpt.errors import CheckpointError, ConfigError
from dist_gpt.model.gpt import GPTConfig
from . import gpt2, llama
from .files import EMBEDDED, WeightFiles, check_weights, read_config, require_config
from .links import to_ours, to_theirs

ARCHS: dict[str, ModuleType] = {t: m for m in (gpt2, llama) for t in m.MODEL_TYPES}
# Settings that do not change the network a config describes, or that the tensors themselves
# decide (a bias dist_gpt lacks is a zero tensor in the file, checked when the tensors are read).
NOT_COMPARED = {"bias", "qkv_bias", "zero_init", "init_std", "dropout", "activation_checkpointing"}


def resolved(cfg: GPTConfig) -> dict:
    """The config's keys with the defaults that depend on other keys filled in."""
    return dataclasses.asdict(cfg) | {"head_dim": cfg.head_size, "mlp_hidden": cfg.hidden_size,
                                      "n_kv_head": cfg.kv_heads, "norm_eps": cfg.eps}


def read_hf_config(directory: str | Path) -> dict:
    require_config(directory)
    hf = read_config(Path(directory))
    if hf is None:
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no config.json with a "
                              "model_type): pass the directory that holds config.json and model.safetensors")
    if hf["model_type"] not in ARCHS:
        raise CheckpointError(f"{Path(directory) / 'config.json'}: model_type {hf['model_type']!r} is not "
                              f"supported: dist_gpt imports {', '.join(ARCHS)}")
    return hf


def gpt_config(raw: Any, where: Path) -> GPTConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} carries no model config: it was not written by dist_gpt's trainer")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{where} has model settings this dist_gpt does not know ({', '.join(unknown)}): "
                              "read it with the dist_gpt version that wrote it")
    return GPTConfig(**raw)


def model_config(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig of an HF config.json: dist_gpt's embedded settings if present and consistent
    with the HF keys, else the one the HF keys describe."""
    embedded = (hf.get(EMBEDDED) or {}).get("model")
    ours = gpt_config(embedded, Path(where)) if embedded is not None else None
    theirs = ARCHS[hf["model_type"]].config_from_hf(hf, where, relu2_ok=ours is not None and ours.mlp == "relu2")
    if ours is None:
        return theirs
    a, b = resolved(ours), resolved(theirs)
    diff = [k for k in a if k not in NOT_COMPARED and a[k] != b[k]]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{where}: its Hugging Face settings say model.{k}={b[k]!r} but its dist_gpt settings "
                              f"say {a[k]!r}: config.json was edited; delete its \"{EMBEDDED}\" entry to import "
                              "it as a plain Hugging Face model")
    return ours


def read_model(directory: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    """(GPTConfig, dist_gpt state dict, HF config) of a Hugging Face model directory."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    where = str(directory / "config.json")
    cfg = model_config(hf, where)
    arch = ARCHS[hf["model_type"]]
    check_weights(directory, hf)
    weights = WeightFiles(directory)
    links = arch.links(cfg, hf, weights.files)
    used = {name for link in links for name in link.theirs}
    extra = [n for n in weights.files if n not in used and not n.endswith(arch.BUFFERS)
             and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{weights.files[extra[0]]}: tensor {extra[0]!r}{more} is not part of a "
                              f"{hf['model_type']} model as dist_gpt computes it: the file is damaged, or the weights "
                              "belong to another architecture; download or copy the model again")
    state = to_ours(links, weights.get, weights.__contains__, cfg, str(directory))
    return cfg, state, hf


def export_config(cfg: GPTConfig) -> dict:
    """The HF config keys of a dist_gpt model: GPT-2 for learned positions, Llama or Qwen3 (with
    qk_norm) for rotary ones. Raises a ConfigError naming the option no architecture expresses."""
    if cfg.block != "prenorm":
        raise ConfigError(f"model.block={cfg.block}: no Hugging Face architecture computes dist_gpt's post-norm "
                          "blocks (a norm after each residual add and a final norm); export with --format "
                          "safetensors")
    if cfg.logit_softcap is not None:
        raise ConfigError(f"model.logit_softcap={cfg.logit_softcap}: the Hugging Face architectures that soft-cap "
                          "logits (Gemma 2 and 3, NanoChat) differ from dist_gpt's blocks elsewhere, so none "
                          "computes this model; export with --format safetensors")
    return (gpt2 if cfg.positions == "learned" else llama).config_to_hf(cfg)


def export_model(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config keys, HF tensors) of a dist_gpt model and its state dict (see `export_config`)."""
    hf = export_config(cfg)
    return hf, to_theirs(ARCHS[hf["model_type"]].links(cfg, hf, None), state)


def init_model_config(run: GPTConfig, init_from: str | None, data=None, unchecked_ids: bool = False) -> GPTConfig:
    """train.init_from: the run's model section when it starts from a Hugging Face model directory.

    Every key comes from the directory's config.json except the training-only ones, which stay the
    run's: block_size (at most the file's context when positions are learned: the position table is
    cropped, as nanoGPT's crop_block_size), dropout, activation_checkpointing, zero_init, init_std.
    With the run's dataset `data`, its tokenizer must be the directory's (the ids must mean the same
    tokens); a directory with no tokenizer to compare is refused unless `unchecked_ids`
    (train.init_from_unchecked_ids). Any other init_from (a dist_gpt run, checkpoint or export)
    returns `run` unchanged."""
    if init_from:
        require_config(init_from)
    if not init_from or read_config(Path(init_from)) is None:
        return run
    hf = read_hf_config(init_from)
    cfg = model_config(hf, str(Path(init_from) / "config.json"))
    if cfg.positions == "learned" and run.block_size > cfg.block_size:
        raise ConfigError(f"model.block_size={run.block_size} is longer than the {cfg.block_size} learned positions "
                          f"of --init-from {init_from}: pass --model.block_size={cfg.block_size} or less")
    if data is not None:
        _check_tokenizer(Path(init_from), hf, cfg, data, unchecked_ids)
    return dataclasses.replace(cfg, block_size=run.block_size, dropout=run.dropout, zero_init=run.zero_init,
                               init_std=run.init_std, activation_checkpointing=run.activation_checkpointing)


def _check_tokenizer(directory: Path, hf: dict, cfg: GPTConfig, data, unchecked_ids: bool = False) -> None:
    """The dataset must be tokenized as the model was: the tokenizer a dist_gpt export records, or
    the directory's tokenizer.json (which `tools.prepare --tokenizer DIR/tokenizer.json` copies byte
    for byte, so their SHA-256 fingerprints agree). With neither there is nothing to compare the
    dataset's ids with: refused unless `unchecked_ids`."""
    fix = f"prepare it with --tokenizer {directory / 'tokenizer.json'}"
    expected = ((hf.get(EMBEDDED) or {}).get("dataset") or {}).get("tokenizer_fingerprint")
    if expected is None and (directory / "tokenizer.json").is_file():
        expected = hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
    if expected is None and not unchecked_ids:
        raise ConfigError(_no_tokenizer(directory))
    if expected is not None and data.tokenizer_fingerprint != expected:
        raise ConfigError(f"the dataset {getattr(data, 'path', '')} was not tokenized with --init-from {directory}'s "
                          f"tokenizer (fingerprint {data.tokenizer_fingerprint[:12]} != {expected[:12]}): {fix}")
    if data.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the dataset has {data.vocab_size} token ids but --init-from {directory} only "
                          f"{cfg.vocab_size}: {fix}")


def _no_tokenizer(directory: Path) -> str:
    """Why --init-from DIR is refused when DIR has no tokenizer.json, and the ways out."""
    unchecked = "or pass --init-from-unchecked-ids to start anyway"
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return (f"--init-from {directory} has vocab.json + merges.txt but no tokenizer.json, which is what dist_gpt "
                "reads, so the dataset's token ids cannot be checked against the model's: write it once with "
                f"python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{directory}')"
                f".save_pretrained('{directory}')\" and prepare the dataset with --tokenizer "
                f"{directory / 'tokenizer.json'}, {unchecked}")
    return (f"--init-from {directory} has no tokenizer.json, so the dataset's token ids cannot be checked against "
            f"the model's: copy the model's tokenizer.json into it and prepare the dataset with --tokenizer "
            f"{directory / 'tokenizer.json'}, {unchecked}")


def init_state_dict(init_from: str, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """train.init_from: the weights of the Hugging Face model directory `init_from` for GPT(cfg), where
    cfg came from `init_model_config` (learned positions cropped to cfg.block_size)."""
    _, state, _ = read_model(init_from)
    if "pos_emb.weight" in state:
        state["pos_emb.weight"] = state["pos_emb.weight"][:cfg.block_size]
    return state
