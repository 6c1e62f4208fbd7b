"""Train a GPT. The same code runs on a laptop CPU, one GPU, a node of 8 GPUs and a SLURM cluster.

    python -m dist_gpt.train                                        # one process, the `cpu` preset
    torchrun --standalone --nproc_per_node=2 -m dist_gpt.train      # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 -m dist_gpt.train --preset gpt2-124m --data.path data/fineweb
    sbatch slurm/train.sh --preset gpt2-124m                        # SLURM, one torchrun per node
    python -m dist_gpt.train --help                                 # every option, default and meaning

With no arguments it prepares the embedded default dataset (the Python standard library's own
source, byte level) if it is missing, trains the `cpu` preset, evaluates, samples, writes
TensorBoard logs to runs/cpu/ and resumes from that run's latest checkpoint when run again.
"""

from __future__ import annotations

from . import faults

# Stop handlers before anything heavy: a signal that arrives while torch imports must not kill a rank.
EARLY_STOP = faults.StopSignals().install() if __name__ == "__main__" else None

import sys  # noqa: E402  (after the handlers, on purpose)
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import config as config_mod  # noqa: E402
from . import dist  # noqa: E402
from .checkpoint import Checkpointer, ModelOptimizerState  # noqa: E402
from .data import DataConfig, Dataset, TrainBatches, ValBlocks, ensure_default_dataset  # noqa: E402
from .errors import ConfigError, UserError  # noqa: E402
from .evaluate import Evaluator  # noqa: E402
from .metrics import make_logger  # noqa: E402
from .model import GPT  # noqa: E402
from .optim import LRSchedule, build_optimizers, clip_grad_norm  # noqa: E402
from .precision import Precision  # noqa: E402
from .resume import RunState, load_into, restore, save_meta  # noqa: E402
from .runinfo import describe_run, resolve_model_config, write_final  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    stop = EARLY_STOP or faults.StopSignals().install()
    closers: list = []
    code, env, heartbeat = 1, None, None
    try:
        cfg = config_mod.parse(argv)
        if cfg is None:  # --help
            code = 0
        else:
            env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads)
            heartbeat = dist.Heartbeat(env)
            code = train(cfg, env, stop, closers, heartbeat)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except RuntimeError as e:
        if heartbeat is None or not env.distributed or not dist.is_collective_failure(e):
            raise
        print(f"error: {heartbeat.describe_failure(e, cfg.train.timeout_s)}", file=sys.stderr)
        code = 4
    dist.shutdown(code, closers)


def open_dataset(cfg: config_mod.Config, env: dist.DistEnv) -> Dataset:
    """Rank 0 prepares the default dataset once while the others wait, then every rank opens it."""
    path = Path(cfg.data.path)
    is_default = path.resolve() == Path(DataConfig.path).resolve()
    if cfg.data.prepare_if_missing and is_default and env.is_main and not (path / "manifest.json").exists():
        ensure_default_dataset(path)
    dist.barrier()
    return Dataset.open(path, verify=cfg.data.verify)


def train(cfg: config_mod.Config, env: dist.DistEnv, stop: faults.StopSignals, closers: list,
          heartbeat: dist.Heartbeat) -> int:
    tc = cfg.train
    torch.manual_seed(tc.seed)
    data = open_dataset(cfg, env)
    cfg.model = resolve_model_config(cfg.model, data)
    accum = tc.global_batch // (tc.micro_batch * env.world_size)
    if accum * tc.micro_batch * env.world_size != tc.global_batch:
        raise ConfigError(
            f"train.global_batch={tc.global_batch} must be a multiple of train.micro_batch × world size "
            f"= {tc.micro_batch} × {env.world_size}: change one of them")

    # The model, its optimizers and schedule; the raw model stays at hand for saving and sampling.
    model = GPT(cfg.model).to(env.device)
    precision = Precision(tc.precision, env.device)
    optimizers = build_optimizers(model, cfg.optim, env.device, exact=precision.name == "fp32")
    schedule = LRSchedule(cfg.optim, tc.steps)
    batches = TrainBatches(data, block_size=cfg.model.block_size, global_batch=tc.global_batch,
                           micro_batch=tc.micro_batch, rank=env.rank, world_size=env.world_size,
                           seed=tc.seed, device=env.device, prefetch=cfg.data.prefetch)
    val = ValBlocks(data, block_size=cfg.model.block_size, batch_size=cfg.eval.batch_size or tc.micro_batch,
                    rank=env.rank, world_size=env.world_size, max_blocks=cfg.eval.max_blocks, device=env.device)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint, env.rank, env.world_size)
    tensors = {"model_optim": ModelOptimizerState(model, optimizers)}
    state = RunState()
    log = make_logger(cfg.run_dir, cfg.log, env.is_main, tc.steps)
    closers.append(log.close)
    restore(cfg, env, ckpt, tensors, state, batches, precision, data, log)
    describe_run(cfg, env, model, data, accum, log)
    fwd_model = torch.compile(model) if use_compile(tc.compile, env.device) else model
    train_model = dist.wrap(fwd_model, env)
    evaluator = Evaluator(fwd_model, model, val, data, precision, cfg.eval, log)
    inject = faults.FaultInjector(env.rank)
    tokens_per_step = tc.global_batch * cfg.model.block_size
    flops_per_token = model.flops_per_token()
    params = [p for p in model.parameters() if p.requires_grad]  # listed once, not at every step
    stopped_by: str | None = None
    train_loss = float("nan")  # the last logged global-batch loss

    while state.step < tc.steps:
        step = state.step
        # 1. evaluate and checkpoint when they are due (both are collective: every rank takes part)
        if evaluator.due(step, state.resumed_step):
            evaluator.run(step)
            state.best_val = min(state.best_val, evaluator.last_loss)
        if ckpt.due(step) and step > max(state.resumed_step, 0):
            save(ckpt, step, tensors, cfg, state, batches, precision, data, evaluator.loss_at(step))
        inject.before_step(step)
        heartbeat.beat(step)

        # 2. forward/backward over the micro-batches of this rank, gradients synced on the last one
        schedule.apply(optimizers, step)
        if cfg.model.dropout:  # resumable: the dropout masks are a function of (seed, step, rank)
            torch.manual_seed(dropout_seed(tc.seed, step, env.rank))
        t0 = time.perf_counter()
        while batches.position in state.bad_positions:  # batches that produced a NaN before a rollback
            batches.skip(1)
        position = batches.position
        micro = batches.next()
        t_data = time.perf_counter() - t0
        loss = forward_backward(train_model, micro, precision, env, inject, position,
                                on_last=lambda: heartbeat.beat(step, phase=1))

        # 3. every rank agrees on stop signals and non-finite losses before touching the weights
        heartbeat.beat(step, phase=2)
        stopped_by, nonfinite = faults.agree(stop, ~torch.isfinite(loss))
        if nonfinite:
            action = on_nonfinite(cfg, env, ckpt, tensors, state, batches, precision, data, position, log)
            if action == "stop":
                return 3
            continue
        grad_norm = optimizer_step(params, optimizers, precision, cfg.optim.grad_clip)
        state.step += 1
        state.tokens += tokens_per_step

        # 4. log (the only place a loss is read back to the host besides the agreement above)
        if log.due(state.step):
            train_loss = (dist.all_reduce_sum(loss.detach().clone()) / env.world_size).item()
            dt = time.perf_counter() - t0
            log.step(state.step, loss=train_loss, lr=optimizers[0].param_groups[0]["lr"],
                     grad_norm=float(grad_norm), step_time=dt, data_time=t_data,
                     tokens_per_s=tokens_per_step / dt, flops_per_token=flops_per_token,
                     device=env.device, dtype=precision.name)
        if stopped_by:
            break

    ckpt.wait()
    if stopped_by:
        path = save(ckpt, state.step, tensors, cfg, state, batches, precision, data, None)
        if env.is_main:
            faults.write_marker(cfg.run_dir, stopped_by, state.step, path)
            log.print(f"{stopped_by}: saved {path} at step {state.step}; requeue marker written")
        return 0

    # 5. the end: final evaluation, sample, checkpoint, summary
    if evaluator.last_step != state.step:
        evaluator.run(state.step)
        state.best_val = min(state.best_val, evaluator.last_loss)
    path = save(ckpt, state.step, tensors, cfg, state, batches, precision, data, evaluator.last_loss)
    ckpt.wait()
    write_final(cfg, env, state, evaluator, path, log, train_loss)
    return 0


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """train.compile, with auto (None) decided: on for CUDA; off on CPU, where compiling the 4 x 4 x 128
    model took 13 s and gained 7.7% per step, so it pays only after ~7,900 steps (docs/PERFORMANCE.md). An explicit true/false always wins."""
    return device.type == "cuda" if setting is None else setting


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step `step`'s dropout masks on `rank`: a pure function, so a resumed run (or a
    NaN rollback) draws the same masks as the uninterrupted one without saving any RNG state."""
    return (seed * 1_000_003 + step) * 4099 + rank


def forward_backward(train_model, micro, precision: Precision, env: dist.DistEnv,
                     inject: faults.FaultInjector, position: int, on_last=lambda: None) -> torch.Tensor:
    """Accumulate gradients over this rank's micro-batches; DDP syncs only on the last one.

    Returns this rank's mean loss over its micro-batches as a 0-d tensor (no host sync).
    """
    losses = []
    n = len(micro)
    for i, (x, y) in enumerate(micro):  # x, y: (micro_batch, block_size) int64
        if i == n - 1:
            on_last()
        sync = nullcontext() if (i == n - 1 or not env.distributed) else train_model.no_sync()
        with sync:
            with precision.autocast():
                loss = train_model(x, y)
            loss = inject.corrupt_loss(loss, position)
            precision.scaler.scale(loss / n).backward()
        losses.append(loss.detach())
    return losses[0] if n == 1 else torch.stack(losses).mean()


def optimizer_step(params: list, optimizers: list, precision: Precision, grad_clip: float) -> torch.Tensor:
    """Unscale (fp16 only), clip, step every optimizer and drop the gradients.

    Returns the global gradient norm before clipping as a 0-d tensor (no host sync).
    """
    if precision.scaler.is_enabled():
        for opt in optimizers:
            precision.scaler.unscale_(opt)
    grad_norm = clip_grad_norm(params, grad_clip)
    for opt in optimizers:
        precision.scaler.step(opt)  # a disabled scaler (every mode but fp16) just calls opt.step()
    precision.scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return grad_norm


def save(ckpt: Checkpointer, step: int, tensors, cfg, state: RunState, batches, precision, data, val_loss):
    meta = save_meta(cfg, state, batches, precision, data, step)
    return ckpt.save(step, tensors, meta, val_loss=val_loss)


def on_nonfinite(cfg, env, ckpt, tensors, state: RunState, batches, precision, data, position, log) -> str:
    """Apply train.nan_policy to a NaN/inf loss seen at global batch `position` (all ranks agree)."""
    for opt in tensors["model_optim"].optimizers:
        opt.zero_grad(set_to_none=True)
    policy = cfg.train.nan_policy
    where = f"non-finite loss at step {state.step} (global batch {position})"
    if policy == "skip":
        state.skipped.append(position)
        log.print(f"{where}: step skipped (train.nan_policy=skip)")
        return "skip"
    if policy == "rollback":
        ckpt.wait()  # an in-flight async save must finish (and retention run) before choosing
        latest = ckpt.latest()
        if latest is None or state.rollbacks >= cfg.train.nan_max_rollbacks:
            why = "no checkpoint to roll back to" if latest is None else f"{state.rollbacks} rollbacks already"
            log.print(f"error: {where}: {why}; stopping (raise train.nan_max_rollbacks or lower optim.lr)")
            return "stop"
        bad = state.bad_positions + [position]
        rollbacks = state.rollbacks + 1
        load_into(latest, cfg, env, ckpt, tensors, state, batches, precision, data)
        state.bad_positions, state.rollbacks = bad, rollbacks
        log.print(f"{where}: rolled back to {latest.name}, skipping that batch (rollback {rollbacks})")
        return "rollback"
    log.print(f"error: {where}; stopping (train.nan_policy=stop; try nan_policy=rollback or a lower optim.lr)")
    return "stop"


if __name__ == "__main__":
    main()
