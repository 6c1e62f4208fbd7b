"""What a run carries across a restart beside its tensors, and the rules for resuming it.

Three of the checkpoint's JSON states live here (the sampler's position and the loss scaler are the
other two; see `trainer.build`), each with `state_dict()` / `load_state_dict()`:

    "config"   ConfigIdentity  the resolved config; on load, checks this run may continue it
    "dataset"  DatasetIdentity the dataset's fingerprint and tokenizer; on load, checks it is the same
    "run"      RunState        step, tokens seen, best validation loss, NaN- and spike-policy bookkeeping

What may change on resume: train.steps (to train longer), train.micro_batch and the world size (the
global batch stays, so the data stream is identical), the parallel layout (parallel.data: ddp, fsdp,
hsdp; DCP reshards), precision, compile (explicitly: auto keeps the train.compile the saved config
recorded, training/compile_choice.py), fp8, device, threads, timeouts, the NaN and spike policies and every
eval/checkpoint/log setting. What may not: the model's shape, the dataset,
the seed and the global batch; changing optimizer settings is allowed but named in the log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dist_gpt.errors import CheckpointError

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
    skipped: list[int] = field(default_factory=list)        # global batches dropped by nan_policy/spike_policy=skip
    spikes: int = 0                                         # loss spikes detected (train.spike_policy)
    spike_history: list[list[float]] = field(default_factory=list)  # [loss, grad norm] of the last spike_window accepted steps
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


class ConfigIdentity:
    """The run's resolved config in the checkpoint; loading one checks this run may continue it."""

    def __init__(self, cfg, log) -> None:
        self.cfg, self.log = cfg, log

    def state_dict(self) -> dict:
        return self.cfg.to_dict()

    def load_state_dict(self, saved: dict) -> None:
        now = self.cfg.to_dict()
        diff = {k: (v, now["model"].get(k)) for k, v in saved["model"].items()
                if k not in MODEL_KEYS_FREE and now["model"].get(k) != v}
        if diff:
            what = ", ".join(f"model.{k}={a!r} there but {b!r} here" for k, (a, b) in diff.items())
            raise CheckpointError(f"the checkpoint holds a different model ({what}): use the same model settings "
                                  "or start a new run with --resume none in another run directory")
        for key in TRAIN_KEYS_FIXED:
            if saved["train"][key] != now["train"][key]:
                raise CheckpointError(f"the checkpoint used train.{key}={saved['train'][key]}, this run has "
                                      f"{now['train'][key]}: resuming needs the same train.{key}")
        if saved["optim"]["name"] != now["optim"]["name"]:
            raise CheckpointError(f"the checkpoint used optim.name={saved['optim']['name']}: its optimizer state "
                                  f"cannot continue as {now['optim']['name']}")
        changed = [k for k, v in saved["optim"].items() if now["optim"].get(k) != v]
        if changed:
            self.log.print(f"note: resuming with changed optimizer settings: {', '.join('optim.' + k for k in changed)}")


class DatasetIdentity:
    """Which dataset (and tokenizer) the run trains on; loading a checkpoint checks it is the same one."""

    def __init__(self, data, path: str) -> None:
        self.data, self.path = data, path

    def state_dict(self) -> dict:
        data = self.data
        return {
            "path": str(self.path),
            "fingerprint": data.fingerprint,
            "tokenizer_fingerprint": data.tokenizer_fingerprint,
            "tokenizer": data.tokenizer.name,
            "tokenizer_spec": data.manifest["tokenizer"]["spec"],
            "vocab_size": data.vocab_size,
            "eot_id": data.eot_id,
            **({"mix": data.spec} if hasattr(data, "sources") else {}),
        }

    def load_state_dict(self, saved: dict) -> None:
        if saved["fingerprint"] != self.data.fingerprint and (hasattr(self.data, "sources") or "mix" in saved):
            raise CheckpointError(f"the checkpoint was trained on {'data.mix=' + saved['mix'] if 'mix' in saved else saved['path']}, "
                                  f"this run on {'data.mix=' + self.data.spec if hasattr(self.data, 'sources') else self.path}: "
                                  "resume with the checkpoint's data.mix sources (data.mix_override changes only "
                                  "weights and phases) or start a new run")
        if saved["fingerprint"] != self.data.fingerprint:
            raise CheckpointError(f"the checkpoint was trained on another dataset ({saved['path']}, fingerprint "
                                  f"{saved['fingerprint'][:12]}) than data.path={self.path} "
                                  f"({self.data.fingerprint[:12]}): pass the same --data.path")
