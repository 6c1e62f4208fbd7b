"""Validation loss in nats and bits per byte, split across ranks; text samples from rank 0.

    python -m dist_gpt.evaluate --run runs/cpu                        # the run's latest checkpoint
    python -m dist_gpt.evaluate --checkpoint runs/cpu/checkpoints/step_0001000
    python -m dist_gpt.evaluate --model model.safetensors --data data/stdlib
    python -m dist_gpt.evaluate --run runs/mix --mix web:data/web:0.7,code:data/code:0.3   # each source, and the total
    python -m dist_gpt.evaluate --run runs/mix --config mix.toml     # the [data.mix.NAME] tables of a run's TOML
    torchrun --standalone --nproc_per_node=2 -m dist_gpt.evaluate --run-dir runs/cpu   # split over 2 ranks
    python -m dist_gpt.evaluate --run runs/cpu --tasks hellaswag,arc_easy   # lm-evaluation-harness (pip install 'dist_gpt[eval]')

(Under torchrun spell it --run-dir: torchrun's own parser takes --run for its --run-path.)
With --tasks the model is scored by lm-evaluation-harness instead (dist_gpt/harness.py).

The command line evaluates on the dataset's whole validation split (every block once). During
training the same code evaluates the fixed `eval.max_blocks` subset every `eval.interval` steps.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch.profiler import record_function

from dist_gpt.parallel import dist
from dist_gpt.checkpoint.state import unwrap_model
from dist_gpt.progress import progress_bar
from .tasks import load_tasks
from dist_gpt.convert.weights import add_source_arguments, load_model


@torch.no_grad()
def validation_loss(model, val, autocast) -> tuple[float, int]:
    """Mean loss over this rank's share of `val`, reduced over ranks -> (nats per token, blocks).
    `autocast` is the run's precision context (Precision.autocast()).

    The ranks' shares differ by at most one block. When a forward pass is collective (fsdp/hsdp
    gather each block's parameters), every rank must run as many as the busiest one: a rank with
    fewer batches repeats its last one without counting it.
    """
    was_training = model.training
    model.eval()
    # (sum of per-token losses, tokens, blocks) on this rank, summed over ranks below.
    acc = torch.zeros(3, dtype=torch.float64, device=val.device)
    batches = 0
    x = y = None
    doc = []
    for x, y, *doc in val:  # x, y (and doc, under model.doc_mask): (b, T)
        with autocast:
            loss = model(x, y, *doc)
        acc[0] += loss.double() * y.numel()  # stays on the device: no sync per batch
        acc[1] += y.numel()
        acc[2] += y.size(0)
        batches += 1
    if dist.is_sharded(model):
        if x is None:  # no block at all on this rank: any input of the right width keeps it in step
            x = y = torch.zeros(1, val.block_size, dtype=torch.long, device=val.device)
        for _ in range(val.max_batches - batches):
            with autocast:
                model(x, y, *doc)  # uncounted: keeps this rank in step with the others' gathers
    model.train(was_training)
    total, tokens, blocks = dist.all_reduce_sum(acc).tolist()
    return total / max(tokens, 1), int(blocks)


def mixture_loss(model, sources: dict, autocast) -> dict[str, dict]:
    """Each source's validation loss (nats/token), bits per byte and blocks, in data.mix's order."""
    out = {}
    for name, val in sources.items():  # collective: every rank takes part in every source, in order
        loss, blocks = validation_loss(model, val, autocast)
        out[name] = {"loss": loss, "bpb": bits_per_byte(loss, val.ds.bytes_per_token("val")), "blocks": blocks}
    return out


def weighted_total(per_source: dict[str, dict], weights: list[float]) -> tuple[float, float, int]:
    """(loss, bpb, blocks): the sources' losses and bits per byte weighted by the fixed evaluation
    weights (comparable across the run whatever the training phase), and all their blocks."""
    loss = sum(w * r["loss"] for w, r in zip(weights, per_source.values()) if w)
    bpb = sum(w * r["bpb"] for w, r in zip(weights, per_source.values()) if w)
    return loss, bpb, sum(r["blocks"] for r in per_source.values())


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / math.log(2) / bytes_per_token


class Evaluator:
    """Decides when validation is due, runs it on every rank, reports it from rank 0 with a text
    sample, and keeps the run's best validation loss in the run state (so it survives a resume).

    `model` is the forward model (compiled or not; never the DDP wrapper, whose forward would sync);
    samples come from the plain module under it. `autocast` is the run's precision context.
    """

    def __init__(self, model, val, autocast, cfg, log, state, sources: dict | None = None,
                 eval_weights: list[float] | None = None) -> None:
        self.model, self.raw_model = model, unwrap_model(model)
        # data.mix: {name: ValBlocks} per source; val/loss is their eval_weights-weighted total
        self.sources, self.eval_weights = sources, eval_weights
        self.last_sources: dict[str, dict] = {}
        self.val, self.autocast, self.cfg, self.log, self.state = val, autocast, cfg, log, state
        self.bytes_per_token = val.ds.bytes_per_token("val")
        # A sharded model's forward passes are collective: then every rank samples, in step.
        self.lockstep = dist.is_sharded(model)
        self.last_step: int | None = None
        self.last_loss = float("nan")
        self.last_bpb = float("nan")
        # eval.tasks: multiple-choice files, read and tokenized once (dist_gpt.tasks)
        self.tasks = load_tasks(cfg.tasks, val.ds.tokenizer, self.raw_model.cfg.block_size, val.ds.eot_id,
                                val.batch_size)

    def maybe_run(self, step: int, final: bool = False) -> None:
        """Evaluate at `step` when eval.interval (or eval.at_start, or the end of the run) asks for it.
        Not at the step the run resumed at: it was evaluated just before that checkpoint was saved."""
        if final:
            due = self.last_step != step
        elif step == self.state.resumed_step:
            due = False
        elif step == 0:
            due = self.cfg.at_start
        else:
            due = self.cfg.interval > 0 and step % self.cfg.interval == 0
        if due:
            self.run(step)

    def loss_at(self, step: int) -> float | None:
        return self.last_loss if self.last_step == step else None

    @record_function("evaluate")  # the label of a train.profile trace
    def run(self, step: int) -> float:
        if self.sources:
            self.last_sources = mixture_loss(self.model, self.sources, self.autocast)
            loss, self.last_bpb, blocks = weighted_total(self.last_sources, self.eval_weights)
        else:
            loss, blocks = validation_loss(self.model, self.val, self.autocast)
            self.last_bpb = bits_per_byte(loss, self.bytes_per_token)
        self.last_step, self.last_loss = step, loss
        self.state.best_val = min(self.state.best_val, loss)
        self.log.eval(step, loss=loss, bpb=self.last_bpb, blocks=blocks, best=self.state.best_val,
                      sources=self.last_sources or None)
        for task in self.tasks:  # collective: every rank scores its share (the plain module: no recompiles)
            task.report(step, task.score(self.raw_model, self.autocast), self.log)
        if self.cfg.sample_tokens and (self.log.is_main or self.lockstep):
            self.log.text(step, "sample", self.sample())
        return loss

    def sample(self) -> str:
        """Rank 0 only and without collectives, unless the model is sharded: then on every rank in
        step, each drawing the same tokens, and always the full eval.sample_tokens (an end-of-text
        token ends the text afterwards), so no rank stops gathering parameters before the others.
        A generator of its own: sampling never moves training's random stream."""
        tokenizer, eot_id, device = self.val.ds.tokenizer, self.val.ds.eot_id, self.val.device
        ids = tokenizer.encode(self.cfg.prompt) or [eot_id or 0]
        idx = torch.tensor([ids[-self.raw_model.cfg.block_size:]], dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(1234)
        with self.autocast:
            out = self.raw_model.generate(idx, self.cfg.sample_tokens, temperature=self.cfg.temperature,
                                          top_k=self.cfg.top_k, eot_id=None if self.lockstep else eot_id,
                                          generator=gen)
        new = out[0, idx.size(1):].tolist()
        if eot_id in new:
            new = new[:new.index(eot_id) + 1]
        return self.cfg.prompt + tokenizer.decode(new)


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dist_gpt.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p, "evaluates")
    p.add_argument("--data", help="dataset directory (default: the one the model was trained on); it must be made "
                                  "with the model's tokenizer")
    p.add_argument("--mix", help="evaluate on each source of a mixture, NAME:PATH:WEIGHT,... as data.mix; prints "
                                 "every source's numbers and their weighted total")
    p.add_argument("--config", help="a training TOML file: its data.mix (and data.mix_phases, data.mix_eval_weights) "
                                    "as --mix; the total uses the evaluation weights training used")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="evaluate on a --data made with another tokenizer anyway (the loss then means nothing "
                        "comparable; a warning says so)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate only this many blocks (default: all)")
    p.add_argument("--precision", default="fp32", help="auto | fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    h = p.add_argument_group("lm-evaluation-harness (instead of the validation loss)")
    h.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    h.add_argument("--include-path", help="directory of your own lm-eval task YAML files")
    h.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1; default all)")
    h.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    h.add_argument("--output", help="write lm-eval's results as JSON to this file")
    return p.parse_args(argv)


def evaluate(argv: list[str] | None) -> int:
    from dist_gpt.data import Dataset, ValBlocks
    from dist_gpt.parallel.precision import Precision

    args = parse_args(argv)
    if args.tasks:
        from dist_gpt.harness import run_tasks

        run_tasks(args.run or args.checkpoint or args.model, args.tasks, args.include_path, args.limit,
                  args.num_fewshot, args.batch_size, args.device, args.precision, args.output)
        return 0
    env = dist.init(args.device)
    args.quiet = args.quiet or not env.is_main  # one progress bar: rank 0's
    model, loaded = load_model(args, env.device)
    if args.mix or args.config:
        return evaluate_mixture(args, env, model, loaded)
    data = Dataset.open(args.data or loaded.data_path)
    check_tokenizer(data, loaded, args.allow_tokenizer_mismatch, warn=env.is_main)
    val = ValBlocks(data, block_size=loaded.config.block_size, batch_size=args.batch_size, rank=env.rank,
                    world_size=env.world_size, max_blocks=args.max_blocks, device=env.device,
                    documents=loaded.config.doc_mask)
    mine = -(-len(val) // env.world_size)  # rank 0's share, the one its bar shows: blocks 0, W, 2W, ...
    with progress_bar(mine, "evaluate", unit="blocks", quiet=args.quiet) as bar:
        loss, blocks = validation_loss(model, Counted(val, bar), Precision(args.precision, env.device).autocast())
    if env.is_main:
        bpb = bits_per_byte(loss, data.bytes_per_token("val"))
        print(f"{loaded.source}: val loss {loss:.4f} nats/token, {bpb:.4f} bits/byte "
              f"over {blocks} blocks of {loaded.config.block_size} tokens")
    return 0


def evaluate_mixture(args, env, model, loaded) -> int:
    """--mix / --config: every source's validation loss and bits per byte, then their weighted total."""
    from dist_gpt.config import load_toml
    from dist_gpt.data import DataConfig, ValBlocks
    from dist_gpt.data.mixloader import open_mixture
    from dist_gpt.errors import ConfigError
    from dist_gpt.parallel.precision import Precision

    data = {k.split(".", 1)[1]: v for k, v in (load_toml(args.config) if args.config else {}).items()
            if k.startswith("data.mix")}
    if args.mix:
        data = {"mix": args.mix}
    if not data.get("mix"):
        raise ConfigError(f"--config {args.config}: the file has no data.mix ([data.mix.NAME] tables) to evaluate on")
    mix = open_mixture(DataConfig(**data))
    check_tokenizer(mix.primary, loaded, args.allow_tokenizer_mismatch, warn=env.is_main)
    vals = {s.name: ValBlocks(s.ds, block_size=loaded.config.block_size, batch_size=args.batch_size, rank=env.rank,
                              world_size=env.world_size, max_blocks=args.max_blocks, device=env.device,
                              documents=loaded.config.doc_mask) for s in mix.sources}
    mine = sum(-(-len(v) // env.world_size) for v in vals.values())
    with progress_bar(mine, "evaluate", unit="blocks", quiet=args.quiet) as bar:
        counted = {name: Counted(v, bar) for name, v in vals.items()}
        per_source = mixture_loss(model, counted, Precision(args.precision, env.device).autocast())
    loss, bpb, blocks = weighted_total(per_source, mix.eval_weights)
    if env.is_main:
        for (name, r), w in zip(per_source.items(), mix.eval_weights):
            print(f"{loaded.source} on {name}: val loss {r['loss']:.4f} nats/token, {r['bpb']:.4f} bits/byte "
                  f"over {r['blocks']} blocks (weight {w:.4g})")
        print(f"{loaded.source}: weighted val loss {loss:.4f} nats/token, {bpb:.4f} bits/byte over {blocks} blocks "
              f"of {loaded.config.block_size} tokens")
    return 0


class Counted:
    """`val`'s batches (what validation_loss iterates), each counted in `bar` by its blocks once
    evaluated; everything else (device, block_size, max_batches) is `val`'s."""

    def __init__(self, val, bar) -> None:
        self.val, self.bar = val, bar

    def __getattr__(self, name):
        return getattr(self.val, name)

    def __iter__(self):
        for batch in self.val:  # (x, y) or (x, y, doc)
            yield batch
            self.bar.update(batch[1].size(0))


def check_tokenizer(data, loaded, allow_mismatch: bool, warn: bool = True) -> None:
    """The dataset must be made with the tokenizer the model was trained with (its fingerprint, which
    the checkpoint or export records): ids of another tokenizer give a loss that means nothing."""
    from dist_gpt.errors import DataError

    if data.vocab_size > loaded.config.vocab_size:
        raise DataError(f"dataset {data.path} has {data.vocab_size} tokens but the model only "
                        f"{loaded.config.vocab_size}: evaluate on a dataset made with the model's tokenizer")
    trained = loaded.dataset.get("tokenizer_fingerprint")
    if trained is None or trained == data.tokenizer_fingerprint:
        return
    what = (f"dataset {data.path} was made with another tokenizer ({data.manifest['tokenizer'].get('name')}, "
            f"fingerprint {data.tokenizer_fingerprint[:12]}) than {loaded.source} was trained with "
            f"({loaded.dataset.get('tokenizer')}, {trained[:12]})")
    if not allow_mismatch:
        raise DataError(f"{what}: evaluate on a dataset made with the model's tokenizer, or pass "
                        "--allow-tokenizer-mismatch to evaluate anyway")
    if warn:
        print(f"WARNING: {what}; evaluating anyway (--allow-tokenizer-mismatch): the loss is not comparable "
              "with the model's own validation loss", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    dist.run_main(evaluate, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
