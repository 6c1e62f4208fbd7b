"""Typed configuration: sections, one override path, strict validation.

Every option is a key of a section and is set as `--section.key=value` (or `--section.key value`).
Precedence, lowest first: the section defaults, the preset (which names a recipe), the TOML file
(`--config FILE`), the command line. A few short flags are aliases of keys:

    --preset NAME      preset to start from (see `dist_gpt.presets`)
    --recipe NAME      train.recipe: classic | modern (the architecture/optimizer/schedule bundle)
    --config FILE      TOML file with [section] tables of keys
    --resume X         checkpoint.resume: auto | none | PATH
    --force            checkpoint.force=true
    --init-from DIR    train.init_from
    --init-from-unchecked-ids    train.init_from_unchecked_ids=true

An unknown key, a bad type or a bad value is a `ConfigError` raised before any rank starts work.
Each component receives only its own section.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint.config import CheckpointConfig
from .data.config import DataConfig
from .data.mixspec import format_mix, format_phases, parse_mix, parse_phases
from .errors import ConfigError
from .memory import dry_run_report
from .metrics import LogConfig
from .model.gpt import GPTConfig
from .optim.optimizers import OptimConfig
from .parallel import compile_rule
from .parallel.dist import ParallelConfig
from .presets import PRESETS, preset_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



def parse_window(text: str | None) -> tuple[int, int] | None:
    """'10:15' -> (10, 15); None stays None; anything else is a ConfigError naming the option."""
    if text is None:
        return None
    start, colon, stop = str(text).partition(":")
    try:
        window = int(start), int(stop)
    except ValueError:
        window = None
    if not colon or window is None or window[0] < 0:
        raise ConfigError(f"train.profile={text!r} must be START:STOP, two step numbers with 0 <= START < STOP "
                          "(e.g. --train.profile=10:15 records steps 10 to 14)")
    if window[0] >= window[1]:
        what = "an empty" if window[0] == window[1] else "a reversed"
        low, high = min(window), max(window)
        raise ConfigError(f"train.profile={text!r} is {what} range: give START < STOP "
                          f"(e.g. --train.profile={low}:{max(high, low + 1)} records steps {low} to {max(high, low + 1) - 1})")
    return window


@dataclass
class TrainConfig:
    """The `train` section: the run, the batch arithmetic, precision and fault policy."""

    name: str = field(default="cpu", metadata={"help": "run name; the run directory is runs/<name> unless train.run_dir is set"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory (checkpoints, TensorBoard, logs); on several nodes it must be on a shared filesystem"})
    recipe: str = field(default="modern", metadata={"help": "training recipe bundle: classic (GPT-2/nanoGPT) | modern (rope, rmsnorm, qk-norm, relu², Muon, WSD)"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps to train (may be raised on resume)"})
    global_batch: int = field(default=32, metadata={"help": "sequences per optimizer step summed over all ranks; gradient accumulation = global_batch / (micro_batch × world size)"})
    micro_batch: int = field(default=16, metadata={"help": "sequences per rank per forward pass"})
    precision: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16 (auto: bf16 autocast on GPU and on CPUs with native bf16, else fp32)"})
    compile: bool | None = field(default=None, metadata={"help": compile_rule.HELP})
    fp8: bool = field(default=False, metadata={"help": "train the blocks' linear layers in FP8 (torchao float8, tensorwise scaling; embeddings and head stay bf16): needs torchao (pip install 'dist_gpt[fp8]'), train.precision bf16 and a GPU of compute capability 8.9+ (H100, L4, RTX 4090); see dist_gpt/parallel/fp8.py"})
    seed: int = field(default=1337, metadata={"help": "seed of initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    init_from: str | None = field(default=None, metadata={"help": "start from the weights of this checkpoint, run directory, .safetensors or Hugging Face model directory (GPT-2, Llama, Qwen2, Qwen3: its config.json gives the model section, except block_size, dropout and activation_checkpointing); fresh optimizer, step 0"})
    init_from_unchecked_ids: bool = field(default=False, metadata={"help": "with init_from a Hugging Face model directory that has no tokenizer.json (so the dataset's token ids cannot be checked against the model's): start anyway, trusting that the dataset was tokenized as the model was"})
    nan_policy: str = field(default="stop", metadata={"help": "on a NaN/inf loss: skip (drop the step) | rollback (reload the last checkpoint and skip the bad batches) | stop"})
    nan_max_rollbacks: int = field(default=3, metadata={"help": "rollbacks allowed before the run stops (nan_policy=rollback)"})
    spike_policy: str = field(default="off", metadata={"help": "on a finite loss spike (the global loss's z-score against the last spike_window steps reaches spike_z, or the gradient norm's reaches spike_grad_z): off | warn (log it) | skip (drop the update) | rollback (reload the last checkpoint and skip the spike_skip_batches global batches that end at the spike; at most nan_max_rollbacks times); see docs/CHECKPOINTS.md"})
    spike_z: float = field(default=6.0, metadata={"help": "z-score (deviations above the window's mean) of the loss that makes a step a spike (> 0)"})
    spike_grad_z: float = field(default=30.0, metadata={"help": "z-score of the gradient norm that makes a step a spike (0 = the loss alone decides); higher than spike_z because gradient norms are heavy-tailed: healthy runs reached z 13 (docs/CHECKPOINTS.md)"})
    spike_window: int = field(default=100, metadata={"help": "accepted steps the mean and deviation are taken over; detection starts once it is full (>= 2)"})
    spike_skip_batches: int = field(default=10, metadata={"help": "spike_policy=rollback: global batches skipped after the rollback, the ones ending at the spike (>= 1)"})
    timeout_s: float = field(default=600.0, metadata={"help": "collective timeout: a rank that stops answering fails the job after this many seconds"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads per rank (default: the cores this rank may use / ranks on the node)"})
    hang_timeout_s: float = field(default=900.0, metadata={"help": "a rank whose own step makes no progress for this many seconds writes every thread's Python stack to <run_dir>/hang/rank<r>.txt and exits 6 (0 = off; paused for the first step, evaluation and saves; keep it above train.timeout_s so a peer's silence is named first)"})
    straggler_ratio: float = field(default=1.3, metadata={"help": "warn when a rank's compute time per step (CPU time of its training thread; CUDA: its forward's GPU time) is at least this many times the other ranks' median (> 1)"})
    straggler_intervals: int = field(default=3, metadata={"help": "... for this many consecutive log intervals (log.interval steps each)"})
    memory_snapshot: bool = field(default=False, metadata={"help": "CUDA: record the allocator's history and dump a memory snapshot to <run_dir>/memory/rank<r>-oom.pickle on out of memory (rank<r>-step<S>.pickle at the end otherwise; open at https://pytorch.org/memory_viz); costs some speed"})
    profile: str | None = field(default=None, metadata={"help": "START:STOP: record a torch.profiler trace of steps START to STOP-1 on every rank into <run_dir>/profile/ (open it in https://ui.perfetto.dev; on CUDA also the allocator's memory timeline for https://pytorch.org/memory_viz); unset = no profiler"})

    def __post_init__(self) -> None:
        _choice("train.recipe", self.recipe, ("classic", "modern"))
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.nan_policy", self.nan_policy, ("skip", "rollback", "stop"))
        _choice("train.spike_policy", self.spike_policy, ("off", "warn", "skip", "rollback"))
        _bound("train.spike_z", self.spike_z, self.spike_z > 0, "> 0", "a step whose loss or gradient norm is this "
               "many deviations above the window's mean is a spike", 6)
        _bound("train.spike_grad_z", self.spike_grad_z, self.spike_grad_z >= 0, ">= 0",
               "0: the gradient norm never makes a spike by itself", 30)
        _bound("train.spike_window", self.spike_window, self.spike_window >= 2, "at least 2",
               "the steps a deviation is taken over", 100)
        _bound("train.spike_skip_batches", self.spike_skip_batches, self.spike_skip_batches >= 1, "at least 1",
               "the global batches a spike rollback skips", 10)
        parse_window(self.profile)
        _bound("train.hang_timeout_s", self.hang_timeout_s, self.hang_timeout_s >= 0, ">= 0",
               "0 turns the hang watchdog off", 900)
        _bound("train.straggler_ratio", self.straggler_ratio, self.straggler_ratio > 1, "> 1",
               "a rank this many times slower than the others is named", 1.3)
        _bound("train.straggler_intervals", self.straggler_intervals, self.straggler_intervals >= 1, "at least 1",
               "the log intervals a rank must stay slow before it is named", 3)
        for key in ("steps", "global_batch", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        # The batch split is checked by `parse` against the launch's world size (grad_accum(world)):
        # checked here on one rank, 9 over micro-batches of 2 on 3 ranks was refused as "2 x 1".

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` ranks: the global batch is the same on any
        world size, so it must split into whole micro-batches on every rank."""
        accum, rest = divmod(self.global_batch, self.micro_batch * world_size)
        if rest or not accum:
            on = f" on {world_size} ranks" if world_size > 1 else ""
            raise ConfigError(
                f"train.global_batch={self.global_batch} must be a multiple of train.micro_batch × world size "
                f"= {self.micro_batch} × {world_size}{on}: change train.global_batch or train.micro_batch")
        return accum


@dataclass
class EvalConfig:
    """The `eval` section: validation loss and text samples, coordinated by rank 0."""

    interval: int = field(default=200, metadata={"help": "evaluate every this many steps (and always at the end); 0 = only at the end"})
    at_start: bool = field(default=True, metadata={"help": "also evaluate before the first step"})
    max_blocks: int | None = field(default=256, metadata={"help": "validation blocks per evaluation, a fixed set (none = the whole validation split)"})
    batch_size: int | None = field(default=None, metadata={"help": "sequences per evaluation forward pass (default train.micro_batch)"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens of text sampled at each evaluation (0 = none)"})
    prompt: str = field(default="\n", metadata={"help": "fixed prompt of the evaluation samples"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature of the evaluation samples"})
    top_k: int | None = field(default=200, metadata={"help": "top-k of the evaluation samples (none = off)"})
    tasks: str | None = field(default=None, metadata={"help": "comma-separated multiple-choice .jsonl files (HellaSwag layout: context, endings, label) scored at every evaluation, split across ranks; logged as val/<file name>/acc and acc_norm (lm-eval's definitions, see dist_gpt/training/tasks.py)"})

    def __post_init__(self) -> None:
        if self.interval < 0 or self.sample_tokens < 0:
            raise ConfigError("eval.interval and eval.sample_tokens must be >= 0")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ConfigError(f"eval.max_blocks must be at least 1 or none, got {self.max_blocks}")


SECTIONS: dict[str, type] = {
    "model": GPTConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "parallel": ParallelConfig,
}

# Short flags and the keys they stand for. A flag without "=" whose key is a bool is set to true.
ALIASES = {
    "recipe": "train.recipe",
    "resume": "checkpoint.resume",
    "force": "checkpoint.force",
    "init-from": "train.init_from",
    "init-from-unchecked-ids": "train.init_from_unchecked_ids",
}


@dataclass
class Config:
    model: GPTConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preset: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.train.name}")


def _bound(key: str, value: float, ok: bool, rule: str, meaning: str, example: float) -> None:
    """One line for a number out of its range: what it must be, what it means, a value that works."""
    if not ok:
        raise ConfigError(f"{key}={value:g} must be {rule} ({meaning}; e.g. --{key}={example:g})")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {' | '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Typed values


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(int | None) -> (int, True); int -> (int, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[base]
    return name + ((" or auto" if base is bool else " or none") if optional else "")


def parse_value(key: str, tp: Any, raw: Any) -> Any:
    """Convert a CLI string or a TOML value to the field's type, or raise a ConfigError."""
    base, optional = _unwrap_optional(tp)
    if optional and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))):
        return None
    if optional and base is bool and isinstance(raw, str) and raw.lower() == "auto":
        return None  # an unset true/false key means "decide for me" (train.compile, optim.fused)
    bad = ConfigError(f"option --{key} expects {_type_name(tp)}, got {raw!r}")
    if isinstance(raw, str) and base is not str:
        text = raw.strip().lower()
        if base is bool:
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise bad
        try:
            return int(text) if base is int else float(text)
        except ValueError:
            raise bad from None
    if base is bool:
        if isinstance(raw, bool):
            return raw
        raise bad
    if base is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise bad
    if base is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        raise bad
    if isinstance(raw, str):
        return raw
    raise bad


def _lookup(section: str, key: str) -> Any:
    """The type of `section.key`, or a ConfigError that suggests the nearest real option."""
    full = f"{section}.{key}"
    if section not in SECTIONS:
        raise ConfigError(f"unknown option --{full}: sections are {', '.join(SECTIONS)}{_suggest(full)}")
    types_ = _field_types(SECTIONS[section])
    if key not in types_:
        raise ConfigError(f"unknown option --{full}{_suggest(full)} (see --help)")
    return types_[key]


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# What other trainers (nanoGPT, Hugging Face, torchtitan) call a key: a key name, or a whole key
# where the name alone would be ambiguous (several sections have an `interval`).
SYNONYMS = {
    "learning_rate": "lr", "max_lr": "lr", "min_lr": "min_lr_ratio", "lr_min": "min_lr_ratio", "warmup": "warmup_steps",
    "warmup_iters": "warmup_steps", "max_grad_norm": "grad_clip", "clip_grad_norm": "grad_clip",
    "optimizer": "optim.name", "max_steps": "steps", "max_iters": "steps", "num_steps": "steps",
    "batch_size": "global_batch", "micro_batch_size": "micro_batch", "dtype": "precision",
    "n_embed": "n_embd", "d_model": "n_embd", "hidden_size": "n_embd", "n_layers": "n_layer",
    "num_layers": "n_layer", "n_heads": "n_head", "num_heads": "n_head", "context_length": "block_size",
    "seq_len": "block_size", "max_seq_len": "block_size", "eval_interval": "eval.interval",
    "log_interval": "log.interval", "save_interval": "checkpoint.interval",
    "checkpoint_interval": "checkpoint.interval", "dataset": "data.path", "data_dir": "data.path",
}


def _suggest(key: str) -> str:
    """' (did you mean --optim.lr?)' for --optim.learning_rate: a known synonym, then the same name in
    another section, then the closest name in the same section, then the closest key anywhere."""
    section, _, name = key.rpartition(".")
    keys = _all_keys()
    name = SYNONYMS.get(name, name)
    if name in keys:
        return f" (did you mean --{name}?)"
    same = [k.split(".", 1)[1] for k in keys if k.startswith(section + ".")]
    guess = next((k for k in keys if k == f"{section}.{name}"), None)
    guess = guess or next((k for k in keys if k.split(".", 1)[1] == name), None)
    close = difflib.get_close_matches(name, same, n=1)
    guess = guess or (f"{section}.{close[0]}" if close else None)
    close = difflib.get_close_matches(key, keys, n=1)
    guess = guess or (close[0] if close else None)
    return f" (did you mean --{guess}?)" if guess else ""


# ---------------------------------------------------------------------------------------------
# Sources of overrides: preset, TOML file, command line. Each yields {"section.key": value}.


def _flatten(tree: dict[str, Any], origin: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, table in tree.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: top-level key {section!r} must be a [section] table")
        for key, value in table.items():
            if f"{section}.{key}" in TABLE_FORMS and isinstance(value, (dict, list)):
                value = TABLE_FORMS[f"{section}.{key}"](value, origin)  # [data.mix.NAME] tables -> one string
            try:
                flat[f"{section}.{key}"] = parse_value(f"{section}.{key}", _lookup(section, key), value)
            except ConfigError as e:
                raise ConfigError(f"config file {origin}: {e}") from None
    return flat


def _table_forms() -> dict:
    return {"data.mix": format_mix, "data.mix_phases": format_phases}


TABLE_FORMS = _table_forms()


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            tree = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: check the path given to --config") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    tree.pop("preset", None)
    return _flatten(tree, path)


@dataclass
class CommandLine:
    preset: str | None = None
    config_file: str | None = None
    help: bool = False
    dry_run: bool = False
    dry_run_world: int | None = None      # plan for this many ranks instead of the launch's
    dry_run_memory: float | None = None   # GiB of one device: say whether each layout fits
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_argv(argv: list[str]) -> CommandLine:
    cl = CommandLine()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            cl.help = True
            continue
        if arg == "--dry-run":
            cl.dry_run = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --section.key=value (see --help)")
        name, eq, value = arg[2:].partition("=")
        if name in ("dry-run-world", "dry-run-memory"):
            if not eq:
                if i >= len(argv):
                    raise ConfigError(f"--{name} needs a value")
                value, i = argv[i], i + 1
            key = "dry_run_world" if name == "dry-run-world" else "dry_run_memory"
            setattr(cl, key, parse_value(name, int if key == "dry_run_world" else float, value))
            cl.dry_run = True
            continue
        if name in ("preset", "config"):
            if not eq:
                if i >= len(argv):
                    raise ConfigError(f"--{name} needs a value")
                value, i = argv[i], i + 1
            setattr(cl, "preset" if name == "preset" else "config_file", value)
            continue
        key = ALIASES.get(name, name)
        if "." not in key:
            raise ConfigError(f"unknown option --{name}{_suggest(key)} (see --help)")
        section, _, k = key.partition(".")
        tp = _lookup(section, k)
        if not eq:
            # `--flag` alone sets a bool key; otherwise the value is the next argument.
            if _unwrap_optional(tp)[0] is bool and (i >= len(argv) or argv[i].startswith("--")):
                value = "true"
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                raise ConfigError(f"--{name} needs a value")
        cl.overrides[key] = parse_value(key, tp, value)
    return cl


# ---------------------------------------------------------------------------------------------
# Resolution


def build(preset: str = "cpu", file: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Resolve preset -> recipe bundle -> preset keys -> TOML file -> overrides into a Config."""
    flat: dict[str, Any] = {}
    file_flat = load_toml(file) if file else {}
    cli = dict(overrides or {})
    # The recipe can come from any layer; the bundle goes under the preset's own keys.
    recipe_override = cli.get("train.recipe", file_flat.get("train.recipe"))
    flat.update(preset_overrides(preset, recipe_override))
    flat.update(file_flat)
    flat.update(cli)
    if flat.get("data.mix") and ("data.path" in file_flat or "data.path" in cli):
        raise ConfigError("data.path and data.mix were both given: a mixture names its datasets itself; drop "
                          "--data.path (or data.path in the TOML file)")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        kwargs = {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == name}
        for k in kwargs:
            _lookup(name, k)
        sections[name] = cls(**kwargs)  # __post_init__ validates the final values
    _check_phases(sections["data"], sections["train"])
    return Config(preset=preset, **sections)


def _check_phases(data, train) -> None:
    """A phase must start inside the run: from a position below train.steps."""
    if data.mix and data.mix_phases:
        for position, _ in parse_phases(data.mix_phases, [s.name for s in parse_mix(data.mix)]):
            if position >= train.steps:
                raise ConfigError(f"data.mix_phases: the phase from {position} starts at or after train.steps="
                                  f"{train.steps}, so it would never run; move it below {train.steps} or raise "
                                  "train.steps")


def parse(argv: list[str] | None = None, world: tuple[int, int] = (1, 1)) -> Config | None:
    """Parse the command line and check it against the launch's (world size, ranks per node); prints
    --help and returns None when asked for help."""
    cl = parse_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = build(cl.preset or "cpu", cl.config_file, cl.overrides)
    if cl.help:
        print(help_text(cfg))
        return None
    if cl.dry_run_world:
        world = (cl.dry_run_world, min(cl.dry_run_world, world[1] if world[0] > 1 else cl.dry_run_world))
    cfg.train.grad_accum(world[0])
    cfg.parallel.check_launch(*world)
    if cl.dry_run:
        print(dry_run_report(cfg, world[0], world[1], cl.dry_run_memory))
        return None
    return cfg


def help_text(cfg: Config) -> str:
    lines = [
        "usage: torchrun --nproc_per_node=N -m dist_gpt.train [--preset NAME] [--config FILE] [--section.key=value ...]",
        "",
        f"presets: {', '.join(PRESETS)} (defaults below are those of --preset {cfg.preset})",
        "aliases: --recipe -> --train.recipe, --resume -> --checkpoint.resume, --force -> --checkpoint.force, --init-from -> --train.init_from, --init-from-unchecked-ids -> --train.init_from_unchecked_ids",
        "--dry-run [--dry-run-world=N] [--dry-run-memory=GIB]: print the run's size and each layout's memory per "
        "rank (on N ranks; whether it fits GIB of device memory), then exit",
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        section = getattr(cfg, name)
        for f in dataclasses.fields(cls):
            value = json.dumps(getattr(section, f.name))
            lines.append(f"  --{name}.{f.name}={value}")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved by `Config.to_dict()` (e.g. from a checkpoint's meta.json)."""
    sections = {name: cls(**tree[name]) for name, cls in SECTIONS.items() if name in tree}
    return Config(preset=tree.get("preset", "cpu"), **sections)
