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
import sys

from .convert.weights import add_source_arguments, load_model
from .data.dataset import Dataset
from .data.loader import ValBlocks
from .config import load_toml
from .data.config import DataConfig
from .data.mixloader import open_mixture
from .errors import ConfigError, DataError
from .harness import TaskOptions, run_tasks
from .parallel import dist
from .parallel.precision import Precision
from .progress import progress_bar
from .training.evaluator import Evaluator, bits_per_byte, mixture_loss, validation_loss, weighted_total

# The old path dist_gpt.evaluate.Evaluator keeps importing; the trainer imports dist_gpt.training.evaluator.
__all__ = ["Evaluator", "bits_per_byte", "check_tokenizer", "evaluate", "main", "validation_loss"]


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
    args = parse_args(argv)
    if args.tasks:
        run_tasks(args.run or args.checkpoint or args.model,
                  TaskOptions(args.tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size,
                              args.device, args.precision, args.output))
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
