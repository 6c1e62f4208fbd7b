"""One builder and one step: the objects a run is made of, and the training step they take.

    trainer = build(cfg, env, stop)   # every component, restored from a checkpoint when there is one
    verdict = trainer.step()          # one optimizer step: PROCEED, or SKIP / ROLLED_BACK (NonFiniteLoss, LossSpikes: stop)

The training loop (`dist_gpt.train`) and the benchmarks (`bench/train_bench.py`) drive exactly
these objects and this step. Each component is handed the few things it uses when it is built:

    batches       TrainBatches: this rank's micro-batches of the global stream (data/loader.py)
    model         the raw GPT (saving, sampling); train_model: compiled and wrapped for distribution
    optimizers    AdamW (+ Muon), with the LR schedule `schedule` (optim.py)
    precision     the autocast context and loss scaler (precision.py)
    state         RunState: step, tokens, best validation loss, NaN bookkeeping (resume.py)
    evaluator     validation loss and samples when due (evaluate.py)
    checkpointer  owns every stateful object above; saves when due, restores, rolls back (checkpoint/)
    guard         FaultGuard: heartbeat, stop signals, NaN and spike policies, fault injection (faults.py)
    log           metrics on rank 0, a no-op elsewhere (metrics.py)
    profiler      a torch.profiler trace of the steps train.profile names (profiler.py)
    clock         this rank's compute and data-wait time, gathered on log steps (stragglers.py)
    watchdog      a step that makes no progress: stacks on file, one line, exit 6 (watchdog.py)

The step's phases carry `record_function` labels (data, forward, backward, agree, optimizer; the
evaluator and checkpointer add evaluate and checkpoint) that a trace shows by name.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function

from dist_gpt.checkpoint.manager import Checkpointer
from dist_gpt.config import parse_window
from dist_gpt.checkpoint.run_state import ConfigIdentity, DatasetIdentity, RunState
from dist_gpt.checkpoint.state import ModelOptimizerState
from dist_gpt.data.config import DataConfig
from dist_gpt.data.dataset import Dataset
from dist_gpt.data.default import ensure_default_dataset
from dist_gpt.data.loader import TrainBatches, ValBlocks
from dist_gpt.data.mixloader import MixtureBatches, open_mixture
from dist_gpt.data.mixspec import parse_mix
from dist_gpt.errors import DataError
from dist_gpt.metrics import QuietLogger, RunLogger, StepReport, Throughput, make_logger
from dist_gpt.model.gpt import GPT
from dist_gpt.optim.optimizers import LRSchedule, build_optimizers, clip_grad_norm, grad_norm
from dist_gpt.parallel import dist, fp8
from dist_gpt.parallel.precision import Precision

from .compile_choice import choose_compile
from .evaluator import Evaluator, SourceBlocks
from .faults import FaultGuard, Verdict
from .profiler import StepProfiler
from .run_files import make_run_dir, resolve_model_config
from .signals import StopSignals
from .stragglers import RankClock
from .watchdog import HangWatchdog


@dataclass
class Trainer:
    """A run's components (built once by `build`) and its training step."""

    model: GPT                     # the raw model: what is saved, sampled and initialised from
    train_model: torch.nn.Module   # the model as trained: compiled, wrapped for distribution
    optimizers: list
    schedule: LRSchedule
    precision: Precision
    batches: TrainBatches
    state: RunState
    evaluator: Evaluator
    checkpointer: Checkpointer
    guard: FaultGuard
    log: RunLogger | QuietLogger
    rank: int = 0
    world_size: int = 1
    seed: int = 0                  # train.seed: dropout masks are a function of (seed, step, rank)
    grad_clip: float = 0.0
    total_steps: int = 0
    profiler: StepProfiler = field(default_factory=lambda: StepProfiler(None, Path("."), 0, torch.device("cpu")))
    clock: RankClock | None = None  # this rank's compute and data-wait time (stragglers.py); built in build()
    watchdog: HangWatchdog = field(default_factory=lambda: HangWatchdog(0, Path("."), 0))  # train.hang_timeout_s
    max_epochs: float = 4.0        # data.max_epochs: warn once past it

    def __post_init__(self) -> None:
        # Per-run constants, looked up once instead of at every step.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = self.precision.autocast()
        self.dropout = self.model.cfg.dropout > 0
        self.tokens_per_step = self.batches.global_batch * self.batches.block_size
        self.train_loss = float("nan")  # the last logged global-batch loss
        self.data_time = 0.0            # seconds the last step waited for its batch
        self.warned_epochs = False

    def step(self) -> Verdict:
        """One training step on every rank: batch, forward/backward, the fault guard's verdict, then
        (on PROCEED) clip, optimizer step and, when due, a log line."""
        step = self.state.step
        self.guard.before_step(step)
        self.schedule.apply(self.optimizers, step)
        if self.dropout:  # resumable: the masks are a function of (seed, step, rank), not of RNG state
            torch.manual_seed(dropout_seed(self.seed, step, self.rank))
        t0, mark = time.perf_counter(), self.clock.begin()  # this rank's compute: all but the agreement
        with record_function("data"):
            position, micro = self._next_batch()
        self.data_time = time.perf_counter() - t0
        self.guard.inject.slow()  # test-only: DIST_GPT_FAULT_SLOW makes one rank a straggler
        loss = forward_backward(self.train_model, micro, self.autocast, self.precision.scaler)
        # train.spike_policy decides before the optimizer step, on the norm the optimizer would clip with
        norm = self._grad_norm() if self.guard.spikes.on else None
        self.clock.end(mark)
        with record_function("agree"):
            verdict = self.guard.after_loss(loss, position, norm)
        if verdict is not Verdict.PROCEED:
            zero_grads(self.optimizers)
            return verdict
        mark = self.clock.begin()
        with record_function("optimizer"):
            norm = optimizer_step(self.params, self.optimizers, self.precision.scaler, self.grad_clip,
                                  norm if not self.precision.scaler.is_enabled() else None)
        self.clock.end(mark)
        self.clock.step_done(self.data_time)
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        if self.log.due(self.state.step):  # the loss came with the agreement: no read-back of our own
            self.train_loss = self.guard.global_loss()
            self.log.step(self.state.step, StepReport(
                loss=self.train_loss, lr=self.optimizers[0].param_groups[0]["lr"], grad_norm=float(norm),
                step_time=time.perf_counter() - t0, data_time=self.data_time, ranks=self.clock.report()))
            self._report_data()
        return verdict

    def _report_data(self) -> None:
        """A mixture's per-source tokens and epochs; one warning when a dataset repeats past data.max_epochs."""
        if hasattr(self.batches, "source_metrics"):
            self.log.scalars(self.state.step, self.batches.source_metrics())
        epochs = self.batches.source_epochs()
        over = {name: e for name, e in epochs.items() if e > self.max_epochs}
        if over and not self.warned_epochs:
            self.warned_epochs = True
            self.log.print("WARNING: " + ", ".join(f"{n} is in epoch {e:.2f}" for n, e in over.items()) +
                           f", past data.max_epochs={self.max_epochs:g}: repeating data this often stops helping; "
                           "add data or train fewer steps")

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm before clipping (0-d tensor); under fp16 the scaled gradients' norm
        over the loss scale (one host read of the scale: fp16 with a spike policy only)."""
        norm = grad_norm(self.params)
        scaler = self.precision.scaler
        return norm / scaler.get_scale() if scaler.is_enabled() else norm

    def _next_batch(self) -> tuple[int, list]:
        """(global batch index, this rank's micro-batches), past the batches a rollback condemned; the
        test hook DIST_GPT_FAULT_POISON_AT may replace one of them by a batch that makes the loss spike."""
        while self.batches.position in self.state.bad_positions:
            self.batches.skip(1)
        position = self.batches.position
        return position, self.guard.inject.poison(position, self.batches.next())


def forward_backward(model, micro: list, autocast, scaler) -> torch.Tensor:
    """Accumulate gradients over this rank's micro-batches; they are reduced over the ranks (DDP's
    all-reduce, FSDP's reduce-scatter) only in the last one's backward.

    Returns this rank's mean loss over its micro-batches as a 0-d tensor (no host sync).
    """
    losses = []
    n = len(micro)
    for i, (x, y, *doc) in enumerate(micro):  # x, y (and doc, under model.doc_mask): (micro_batch, block_size) int64
        sync = dist.no_grad_sync(model) if i < n - 1 else nullcontext()
        with sync:
            with record_function("forward"), autocast:
                loss = model(x, y, *doc)
            with record_function("backward"):
                scaler.scale(loss / n).backward()
        losses.append(loss.detach())
    return losses[0] if n == 1 else torch.stack(losses).mean()


def optimizer_step(params: list, optimizers: list, scaler, grad_clip: float, norm=None) -> torch.Tensor:
    """Unscale (fp16 only), clip, step every optimizer and drop the gradients. `norm`: the gradients'
    global norm when the caller computed it already (the spike policy), else computed here.

    Returns the global gradient norm before clipping as a 0-d tensor (no host sync).
    """
    if scaler.is_enabled():
        for opt in optimizers:
            scaler.unscale_(opt)
    grad_norm = clip_grad_norm(params, grad_clip, norm)
    for opt in optimizers:
        scaler.step(opt)  # a disabled scaler (every mode but fp16) just calls opt.step()
    scaler.update()
    zero_grads(optimizers)
    return grad_norm


def zero_grads(optimizers: list) -> None:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step `step`'s dropout masks on `rank`: a pure function, so a resumed run (or a
    NaN rollback) draws the same masks as the uninterrupted one without saving any RNG state."""
    return (seed * 1_000_003 + step) * 4099 + rank


# ---------------------------------------------------------------------------------------------
# Building


def build(cfg, env: dist.DistEnv, stop: StopSignals, log: QuietLogger | None = None, init=None) -> Trainer:
    """Every component of a run, wired once, then restored: from checkpoint.resume's checkpoint when
    there is one, else from train.init_from's weights. `init` reads those (the train command passes
    dist_gpt.convert.weights.InitFrom(cfg.train.init_from), so this package never imports the
    conversions). `log` replaces the run's logger (the benchmarks pass a QuietLogger)."""
    tc = cfg.train
    if tc.init_from and init is None:
        raise ValueError("train.init_from is set: pass init=dist_gpt.convert.weights.InitFrom(cfg.train.init_from)")
    torch.manual_seed(tc.seed)  # the model's initial weights
    data = open_dataset(cfg, env)
    cfg.model = resolve_model_config(init.model_config(cfg.model, data) if init else cfg.model, data)
    precision = Precision(tc.precision, env.device)
    compiling = choose_compile(cfg, env)  # auto decided (or kept as the resumed checkpoint recorded)
    tc.compile = compiling.on             # resolved: the checkpoint's config records what the run compiles with
    model, fwd_model, train_model = build_model(cfg, env, precision.name)
    optimizers = build_optimizers(model, cfg.optim, env.device, exact=precision.name == "fp32",
                                  process_group=dist.replica_group(env, cfg.parallel))
    batches = train_batches(cfg, env, data)
    make_run_dir(cfg.run_dir, env)
    throughput = Throughput.of(cfg.log, env, precision.name, tc.global_batch * cfg.model.block_size,
                               model.flops_per_token())
    log = log or make_logger(cfg.run_dir, cfg.log, env.is_main, tc.steps, throughput)
    log.print(f"compile: {compiling.reason}")
    state = RunState()
    vals = val_blocks(cfg, env, data)
    val = SourceBlocks(vals, data.eval_weights) if cfg.data.mix else next(iter(vals.values()))
    evaluator = Evaluator(fwd_model, val, precision.autocast(), cfg.eval, log, state)
    if cfg.data.mix:
        note_mixture(data, cfg.data.mix, log)
    checkpointer = Checkpointer(
        cfg.run_dir / "checkpoints", cfg.checkpoint, env,
        tensors={"model_optim": ModelOptimizerState(model, optimizers)},
        json_states={"config": ConfigIdentity(cfg, log), "dataset": DatasetIdentity(data, data.path if cfg.data.mix else cfg.data.path),
                     "run": state, "batches": batches, "precision": precision},
        val_loss=evaluator.loss_at)
    guard = FaultGuard(tc, env, stop, state, checkpointer.rollback, log)
    restore(checkpointer, model, init, state, batches, log)
    dist.settle_buckets(train_model, lambda: first_backward(train_model, cfg, env.device, precision))
    return Trainer(model=model, train_model=train_model, optimizers=optimizers,
                   schedule=LRSchedule(cfg.optim, tc.steps), precision=precision, batches=batches, state=state,
                   evaluator=evaluator, checkpointer=checkpointer, guard=guard, log=log, rank=env.rank,
                   world_size=env.world_size, seed=tc.seed, grad_clip=cfg.optim.grad_clip, total_steps=tc.steps,
                   profiler=StepProfiler(parse_window(tc.profile), cfg.run_dir, env.rank, env.device,
                                         keep_history=tc.memory_snapshot),
                   clock=RankClock(env, train_model, tc.straggler_ratio, tc.straggler_intervals, log),
                   watchdog=HangWatchdog(tc.hang_timeout_s, cfg.run_dir, env.rank),
                   max_epochs=cfg.data.max_epochs)


def first_backward(model: torch.nn.Module, cfg, device: torch.device, precision: Precision) -> None:
    """One forward/backward of a training micro-batch's shape (zeros; one document), for
    dist.settle_buckets: the same shapes and autocast as a real step, so a compiled model compiles once."""
    x = torch.zeros(cfg.train.micro_batch, cfg.model.block_size, dtype=torch.long, device=device)
    doc = [torch.zeros_like(x)] if cfg.model.doc_mask else []
    with precision.autocast():
        loss = model(x, x, *doc)
    loss.backward()


def build_model(cfg, env: dist.DistEnv, precision: str) -> tuple[GPT, torch.nn.Module, torch.nn.Module]:
    """(raw model, forward model, training model) laid out as `parallel` says (dist.parallelize).

    ddp: built whole on the CPU, moved to the device. fsdp/hsdp: built on the meta device (no memory),
    sharded, then each rank initialises only its share, one parameter at a time, with the weights
    an unsharded build of the same seed has (dist.materialize).
    """
    if cfg.train.fp8:  # the entry point checked it already; a benchmark building a run here has not
        fp8.check(env.device, precision)
    mesh = dist.device_mesh(env, cfg.parallel)
    if mesh is None:
        model = GPT(cfg.model).to(env.device)
    else:
        with torch.device("meta"):
            model = GPT(cfg.model)
    transforms = dist.Transforms(compile=dist.use_compile(cfg.train.compile, env.device), precision=precision,
                                 fp8=cfg.train.fp8)
    fwd_model, train_model = dist.parallelize(model, env, cfg.parallel, mesh, transforms)
    if mesh is not None:
        dist.materialize(model, env.device)
    return model, fwd_model, train_model


def train_batches(cfg, env: dist.DistEnv, data) -> TrainBatches:
    """This rank's training stream: of data.path, or of data.mix's sources (MixtureBatches)."""
    tc = cfg.train
    common = dict(block_size=cfg.model.block_size, global_batch=tc.global_batch, micro_batch=tc.micro_batch,
                  rank=env.rank, world_size=env.world_size, seed=tc.seed, device=env.device,
                  prefetch=cfg.data.prefetch, align=cfg.data.align, documents=cfg.model.doc_mask)
    if cfg.data.mix:
        return MixtureBatches(data, **common, override=cfg.data.mix_override)
    return TrainBatches(data, **common)


def val_blocks(cfg, env: dist.DistEnv, data) -> dict[str, ValBlocks]:
    """The validation sets: {name: ValBlocks} per source of data.mix (eval.max_blocks each), or one."""
    def blocks(ds, name):
        try:
            return ValBlocks(ds, block_size=cfg.model.block_size, batch_size=cfg.eval.batch_size or cfg.train.micro_batch,
                             rank=env.rank, world_size=env.world_size, max_blocks=cfg.eval.max_blocks,
                             device=env.device, documents=cfg.model.doc_mask)
        except DataError as e:
            raise DataError(f"data.mix source {name!r}: {e}" if cfg.data.mix else str(e)) from None

    if cfg.data.mix:
        return {s.name: blocks(s.ds, s.name) for s in data.sources}
    return {"": blocks(data, "")}


def note_mixture(mix, spec: str, log) -> None:
    """One line on rank 0 saying what the mixture is, normalised."""
    raw = sum(s.weight for s in parse_mix(spec))
    shares = ", ".join(f"{s.name} {s.weight:.4g}" for s in mix.sources)
    note = f" (the weights summed to {raw:g}: normalised)" if abs(raw - 1) > 1e-9 else ""
    log.print(f"data.mix: {shares}{note}; {len(mix.phases)} phase(s); val/loss weights "
              + ", ".join(f"{n} {w:.4g}" for n, w in zip(mix.names, mix.eval_weights)))


def open_dataset(cfg, env: dist.DistEnv) -> Dataset:
    """Rank 0 prepares the default dataset once while the others wait, then every rank opens it
    (every source of data.mix instead, when given)."""
    if cfg.data.mix:
        return open_mixture(cfg.data)
    path = Path(cfg.data.path)
    is_default = path.resolve() == Path(DataConfig.path).resolve()
    if cfg.data.prepare_if_missing and is_default and env.is_main and not (path / "manifest.json").exists():
        ensure_default_dataset(path)
    dist.barrier()
    return Dataset.open(path, verify=cfg.data.verify)


def restore(checkpointer: Checkpointer, model: GPT, init, state: RunState, batches: TrainBatches, log) -> None:
    """checkpoint.resume first; a fresh run with train.init_from starts from those weights instead."""
    path = checkpointer.restore()
    if path is not None:
        log.print(f"resumed from {path} at step {state.step} ({state.tokens:,} tokens, "
                  f"global batch {batches.position})")
    elif init is not None:
        init.load_into(model)
        log.print(f"initialised the weights from {init.source} (fresh optimizer, step 0)")
