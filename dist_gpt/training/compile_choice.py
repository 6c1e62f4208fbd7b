"""train.compile decided for this run, before its model is built.

    choice = choose_compile(cfg, env)   # collective: rank 0 reads the resumed checkpoint's record
    cfg.train.compile = choice.on       # resolved, as model.vocab_size is: the checkpoint records it
    log.print(f"compile: {choice.reason}")

The rule is dist_gpt/parallel/compile_rule.py. The record is the checkpoint's "config" state: its
train.compile holds what the run compiled with (the resolved value), so a resumed run with auto
keeps it even when it now trains longer; a checkpoint whose train.compile is unset (written before
auto was resolved) resumes as auto decided then (on for CUDA, off on CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_gpt.checkpoint.layout import list_checkpoints, read_meta
from dist_gpt.checkpoint.retention import resolve_checkpoint
from dist_gpt.errors import CheckpointError, ConfigError
from dist_gpt.parallel import dist
from dist_gpt.parallel.compile_rule import CompileCase, CompileChoice, decide, refusal


def choose_compile(cfg, env: dist.DistEnv) -> CompileChoice:
    """train.compile with auto decided (every rank gets rank 0's choice); a ConfigError for an
    explicit true where compiling cannot work."""
    refused = refusal(env.device.type) if cfg.train.compile is not False else None
    if cfg.train.compile and refused:
        raise ConfigError(f"train.compile=true cannot work here: {refused}; pass --train.compile=false "
                          "(or auto, which then trains eagerly)")
    resumed, recorded = dist.from_rank0(recorded_compile(cfg) if env.is_main else None)
    case = compile_case(cfg, env.world_size, env.device.type, torch.get_num_threads(), refused)
    return decide(cfg.train.compile, case, recorded=recorded, resumed=resumed)


def compile_case(cfg, world_size: int, device: str, threads: int, refused: str | None = None) -> CompileCase:
    """The rule's view of a run: its steps and its per-rank shape."""
    m, tc = cfg.model, cfg.train
    tokens = tc.global_batch // world_size * m.block_size  # per rank per step
    micro_steps = max(1, tc.global_batch // (tc.micro_batch * world_size))
    return CompileCase(device=device, steps=tc.steps, n_layer=m.n_layer, micro_steps=micro_steps,
                       width_work=float(tokens * m.n_layer * m.n_embd ** 2), threads=threads, refused=refused,
                       composite=m.norm == "rmsnorm" or m.positions == "rope" or m.qk_norm or m.mlp == "relu2")


def recorded_compile(cfg) -> tuple[bool, bool | None]:
    """(a checkpoint will be resumed, the train.compile it recorded). A checkpoint that cannot be read
    counts as none here: restoring it names the problem in one line."""
    path = resume_target(cfg.checkpoint.resume, Path(cfg.run_dir) / "checkpoints")
    if path is None:
        return False, None
    try:
        meta = read_meta(path)
    except CheckpointError:
        return False, None
    train = meta.get("config", {}).get("train", {})
    return True, train.get("compile")


def resume_target(resume: str, root: Path) -> Path | None:
    """The checkpoint `Checkpointer.restore` will load for checkpoint.resume, or None."""
    if resume == "none":
        return None
    if resume == "auto":
        done = [c for c in list_checkpoints(root) if c.complete]
        return done[-1].path if done else None
    try:
        return resolve_checkpoint(Path(resume))
    except CheckpointError:
        return None
