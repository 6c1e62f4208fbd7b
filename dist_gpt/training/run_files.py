"""A run describes itself: resolved config, code version, libraries, world, batch arithmetic.

Rank 0 writes `config.json` (the resolved config, loadable with `--config` after conversion, and
by `dist_gpt.config.from_dict`), `run.json` (git SHA, versions, hardware, world size, tokens per
step) at the start and `final.json` (the final losses and where everything went) at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dist_gpt.errors import ConfigError
from dist_gpt.metrics import format_params
from dist_gpt.parallel import dist


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_model_config(model_cfg, data):
    """vocab_size 0 takes the dataset's; otherwise it must hold every token id of the dataset."""
    if model_cfg.vocab_size == 0:
        return dataclasses.replace(model_cfg, vocab_size=data.vocab_size)
    if model_cfg.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the dataset's vocabulary "
                          f"({data.vocab_size} tokens): pass --model.vocab_size={data.vocab_size} "
                          "(or a multiple of 64 above it)")
    return model_cfg


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def make_run_dir(run_dir: Path, env) -> None:
    """Rank 0 creates the run directory; every rank learns the outcome and fails alike if it could not."""
    error = None
    if env.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            error = (f"cannot write the run directory {run_dir} ({e.strerror or e}): pass a writable "
                     "--train.run_dir (on several nodes, a filesystem every node sees)")
    error = dist.from_rank0(error)
    if error:
        raise ConfigError(error)


def layout_name(parallel, env) -> str:
    """'ddp', 'fsdp over 4 ranks', 'hsdp 2 × 2 (replicas × shard)', or a note that one process shards nothing."""
    if parallel.data == "ddp":
        return "ddp"
    if not env.distributed:
        return f"{parallel.data} (one process: nothing to shard)"
    shape = parallel.mesh_shape(env.world_size, env.local_world_size)
    return f"fsdp over {shape[0]} ranks" if len(shape) == 1 else f"hsdp {shape[0]} × {shape[1]} (replicas × shard)"


def describe_run(cfg, env, model, data, log) -> None:
    tokens_per_step = cfg.train.global_batch * cfg.model.block_size
    accum = cfg.train.grad_accum(env.world_size)
    info = {
        "git_sha": git_sha(),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(env.device),
        "device_name": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else platform.processor(),
        "world_size": env.world_size,
        "backend": env.backend,
        "layout": layout_name(cfg.parallel, env),
        "threads_per_rank": torch.get_num_threads(),
        "compile": dist.use_compile(cfg.train.compile, env.device),  # train.compile with auto decided
        "grad_accum": accum,
        "tokens_per_step": tokens_per_step,
        "params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "dataset": {"path": str(data.path) if cfg.data.mix else cfg.data.path, "mix": cfg.data.mix, "fingerprint": data.fingerprint, "vocab_size": data.vocab_size,
                    "train_tokens": data.num_tokens("train"), "val_tokens": data.num_tokens("val")},
        "started_at": time.time(),
    }
    if env.is_main:
        _write_json(cfg.run_dir / "config.json", cfg.to_dict())
        _write_json(cfg.run_dir / "run.json", info)
    log.print(f"dist_gpt: preset {cfg.preset}, recipe {cfg.train.recipe}, {format_params(model)}, "
              f"world {env.world_size} × {env.device.type} ({env.backend or 'no process group'}), "
              f"{torch.get_num_threads()} threads/rank, layout {layout_name(cfg.parallel, env)}, "
              f"compile {'on' if info['compile'] else 'off'}{', fp8' if cfg.train.fp8 else ''}")
    log.print(f"batch: {cfg.train.global_batch} seqs × {cfg.model.block_size} tokens = {tokens_per_step:,} tokens/step "
              f"= {cfg.train.micro_batch} micro × {accum} accum × {env.world_size} ranks; "
              f"{cfg.train.steps} steps = {cfg.train.steps * tokens_per_step / 1e6:.1f}M tokens "
              f"({cfg.train.steps * tokens_per_step / max(1, data.num_tokens('train')):.2f} epochs)")
    log.print(f"data: {cfg.data.mix or cfg.data.path} ({data.num_tokens('train'):,} train / {data.num_tokens('val'):,} val tokens, "
              f"vocab {data.vocab_size}); run dir: {cfg.run_dir}; git {info['git_sha'] or 'unknown'}")
    log.hparams(cfg.to_dict())


def write_final(run_dir: Path, trainer, checkpoint: Path | None) -> None:
    """Rank 0 writes final.json and prints where everything went: the trainer's state, last losses and, for
    a data.mix, what each source delivered ({name: {path, tokens, blocks, epochs, ...}}) with its last
    validation numbers."""
    state, evaluator, train_loss, log = trainer.state, trainer.evaluator, trainer.train_loss, trainer.log
    sources = trainer.batches.delivered_summary()
    final = {
        "step": state.step,
        "tokens": state.tokens,
        "train_loss": None if math.isnan(train_loss) else train_loss,  # NaN: no step ran (valid JSON)
        "val_loss": evaluator.last_loss,
        "val_bpb": evaluator.last_bpb,
        "best_val_loss": None if math.isinf(state.best_val) else state.best_val,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "run_dir": str(run_dir),
    }
    if sources is not None:
        final["sources"] = {name: {**row, **{f"val_{k}": v for k, v in evaluator.last_sources.get(name, {}).items()}}
                            for name, row in sources.items()}
    if log.is_main:
        _write_json(run_dir / "final.json", final)
    nats_per_byte = evaluator.last_loss / evaluator.bytes_per_token
    log.print(f"checkpoint:  {checkpoint}\n"
              f"run dir:     {run_dir}  (config.json, run.json, final.json, metrics.jsonl, TensorBoard events)\n"
              f"sample:      python -m dist_gpt.sample --run {run_dir}\n"
              f"tensorboard: tensorboard --logdir {run_dir.parent}")
    log.print(f"final: step {state.step}, {state.tokens / 1e6:.2f}M tokens, val loss {nats_per_byte:.4f} nats/byte "
              f"({evaluator.last_loss:.4f} nats/token), {evaluator.last_bpb:.4f} bits/byte")
