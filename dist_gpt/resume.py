"""What a run carries across a restart, and the rules for resuming it.

A checkpoint's tensors (model and optimizer state) go through DCP; everything else is the JSON
`meta` built here: the step, tokens seen, the sampler's position, the LR schedule's settings, the
loss scaler, the best validation loss, the resolved config and the dataset's fingerprint.

What may change on resume: train.steps (to train longer), train.micro_batch and the world size (the
global batch stays, so the data stream is identical), precision, compile, device, threads, timeouts,
the NaN policy and every eval/checkpoint/log setting. What may not: the model's shape, the dataset,
the seed and the global batch; changing optimizer settings is allowed but named in the log.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from .errors import CheckpointError, ConfigError

# Model keys that do not change the parameters' shapes or values.
MODEL_KEYS_FREE = {"dropout", "activation_checkpointing"}
TRAIN_KEYS_FIXED = ("seed", "global_batch")


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    best_val: float = float("inf")
    rollbacks: int = 0
    bad_positions: list[int] = field(default_factory=list)  # global batches skipped after a NaN rollback
    skipped: list[int] = field(default_factory=list)        # global batches dropped by nan_policy=skip
    resumed_step: int = -1                                  # the step this process resumed at (-1: fresh)

    def state_dict(self) -> dict:
        out = asdict(self)
        out.pop("resumed_step")
        out["best_val"] = None if self.best_val == float("inf") else self.best_val
        return out

    def load_state_dict(self, sd: dict) -> None:
        for key, value in sd.items():
            setattr(self, key, value)
        if self.best_val is None:
            self.best_val = float("inf")
        self.resumed_step = self.step


def save_meta(cfg, state: RunState, batches, precision, data, step: int) -> dict:
    return {
        "step": step,
        "run": state.state_dict() | {"step": step},
        "batches": batches.state_dict(),
        "precision": precision.state_dict(),
        "config": cfg.to_dict(),
        "dataset": {
            "path": str(data.path) if hasattr(data, "path") else cfg.data.path,
            "fingerprint": data.fingerprint,
            "tokenizer_fingerprint": data.tokenizer_fingerprint,
            "tokenizer": data.tokenizer.name,
            "tokenizer_spec": data.manifest["tokenizer"]["spec"],
            "vocab_size": data.vocab_size,
            "eot_id": data.eot_id,
        },
        "saved_at": time.time(),
    }


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "meta.json"
    try:
        return json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file} is missing: {path} is not a complete dist_gpt checkpoint; "
                              "pass --resume with another checkpoint or --resume none") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}): pass --resume with another checkpoint") from None


def check_compatible(meta: dict, cfg, data, path: Path, log=None) -> None:
    """Refuse, with a clear message, a checkpoint that this configuration cannot continue."""
    saved = meta["config"]
    now = cfg.to_dict()
    where = f"checkpoint {path}"
    diff = {k: (v, now["model"].get(k)) for k, v in saved["model"].items()
            if k not in MODEL_KEYS_FREE and now["model"].get(k) != v}
    if diff:
        what = ", ".join(f"model.{k}={a!r} there but {b!r} here" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where} holds a different model ({what}): use the same model settings "
                              "or start a new run with --resume none in another run directory")
    if meta["dataset"]["fingerprint"] != data.fingerprint:
        raise CheckpointError(f"{where} was trained on another dataset ({meta['dataset']['path']}, fingerprint "
                              f"{meta['dataset']['fingerprint'][:12]}) than data.path={cfg.data.path} "
                              f"({data.fingerprint[:12]}): pass the same --data.path")
    for key in TRAIN_KEYS_FIXED:
        if saved["train"][key] != now["train"][key]:
            raise CheckpointError(f"{where} used train.{key}={saved['train'][key]}, this run has "
                                  f"{now['train'][key]}: resuming needs the same train.{key}")
    if saved["optim"]["name"] != now["optim"]["name"]:
        raise CheckpointError(f"{where} used optim.name={saved['optim']['name']}: its optimizer state cannot "
                              f"continue as {now['optim']['name']}")
    changed = [k for k, v in saved["optim"].items() if now["optim"].get(k) != v]
    if changed and log is not None:
        log.print(f"note: resuming with changed optimizer settings: {', '.join('optim.' + k for k in changed)}")


def load_into(path: Path, cfg, env, ckpt, tensors, state: RunState, batches, precision, data, log=None) -> dict:
    meta = read_meta(path)
    check_compatible(meta, cfg, data, path, log)
    ckpt.load(path, tensors)
    state.load_state_dict(meta["run"])
    batches.load_state_dict(meta["batches"])
    precision.load_state_dict(meta["precision"])
    return meta


def restore(cfg, env, ckpt, tensors, state: RunState, batches, precision, data, log) -> None:
    """Apply checkpoint.resume (auto | none | PATH) and train.init_from before the first step."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        if ckpt.has_checkpoints():
            if not cfg.checkpoint.force:
                raise ConfigError(f"{ckpt.root} already holds checkpoints and --resume none would start over: "
                                  "pass --resume auto to continue, --force to start fresh (the old "
                                  "checkpoints are moved aside, not deleted), or another --train.run_dir")
            _move_aside(ckpt, env)
        path = None
    elif resume == "auto":
        path = ckpt.latest()
    else:
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint; pass a checkpoint directory, "
                                  "auto or none")
        if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
            path = type(ckpt)(path / "checkpoints", cfg.checkpoint, env.rank, env.world_size).latest()
            if path is None:
                raise CheckpointError(f"--resume {resume}: that run directory holds no complete checkpoint")
    if path is not None:
        load_into(path, cfg, env, ckpt, tensors, state, batches, precision, data, log)
        log.print(f"resumed from {path} at step {state.step} ({state.tokens:,} tokens, "
                  f"global batch {batches.position})")
    elif cfg.train.init_from:
        init_weights(cfg, tensors["model_optim"].model, env)
        log.print(f"initialised the weights from {cfg.train.init_from} (fresh optimizer, step 0)")


def init_weights(cfg, model, env) -> None:
    """train.init_from: weights only, fresh optimizer, step 0 (nanoGPT's init_from)."""
    from .weights import load_weights

    loaded = load_weights(cfg.train.init_from, device="cpu")
    theirs, ours = asdict(loaded.config), asdict(cfg.model)
    diff = [k for k, v in theirs.items() if k not in MODEL_KEYS_FREE and ours.get(k) != v]
    if diff:
        what = ", ".join(f"--model.{k}={theirs[k]}" for k in diff)
        raise ConfigError(f"--init-from {cfg.train.init_from} holds a model with other settings: pass {what}")
    model.load_state_dict(loaded.state_dict, strict=True)


def _move_aside(ckpt, env) -> None:
    from . import dist

    if env.is_main:
        aside = ckpt.root.with_name(f"{ckpt.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(ckpt.root), str(aside))
        print(f"--force: moved the old checkpoints to {aside}")
    dist.barrier()
