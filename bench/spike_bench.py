"""A loss spike and train.spike_policy: the final validation loss of a poisoned run under each policy
against a clean run of the same config.

    python -m bench.spike_bench                      # clean, off, skip, rollback; 3 seeds (~20 min on 2 busy cores)
    python -m bench.spike_bench --seeds 1 --steps 300 --poison-at 175     # a quick look
    python -m bench.spike_bench --policies clean off                      # only these sides

Every side trains the `cpu` preset at a small shape (SHAPE: 2 layers, 64 wide, context 64, batch
16; fp32, one thread) with the classic recipe (`--recipe`) for --steps steps on the embedded default
corpus, saving a checkpoint every --checkpoint-interval steps, with gradient clipping off
(`--grad-clip`, default 0): clipped to the recipes' 1.0, one poisoned batch moved the modern
recipe's final loss by less than 0.001 (by 0.006 unclipped: Muon's updates are normalised), so
there would be nothing for a policy to repair. The poisoned sides set DIST_GPT_FAULT_POISON_AT: every token of the global batch
at --poison-at becomes token 0, once (dist_gpt/hooks.py), a finite spike whose one update damages
the run; `off` takes that update, `skip` drops it, `rollback` reloads the checkpoint before the
spike and skips the train.spike_skip_batches batches that end at it. `clean` is not poisoned and
runs spike_policy=warn, so its spike count is the detector's false alarms. Each run is evaluated
once, at the end, on EVAL_BLOCKS validation blocks. The table prints, per side, the mean final
validation loss over the seeds, its difference to clean, the spikes each side detected per run
and the largest z-score it logged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPE = ["--model.n_layer=2", "--model.n_head=4", "--model.n_embd=64", "--model.block_size=64",
         "--train.global_batch=16", "--train.micro_batch=16"]
COMMON = ["--preset", "cpu", "--train.precision=fp32", "--train.threads=1", "--eval.sample_tokens=0",
          "--log.tensorboard=false", "--eval.interval=0", "--eval.at_start=false", "--checkpoint.keep_best=false",
          "--log.interval=50", "--resume", "none"]
EVAL_BLOCKS = 256
POLICIES = ("clean", "off", "warn", "skip", "rollback")


def run(side: str, seed: int, args, root: Path) -> dict:
    """Train one side; returns its final validation loss and the spikes its metrics.jsonl logged."""
    run_dir = root / f"{side}-{seed}"
    cmd = [sys.executable, "-m", "dist_gpt.train", *COMMON, f"--recipe={args.recipe}", *SHAPE, f"--train.steps={args.steps}",
           f"--train.seed={seed}", f"--eval.max_blocks={EVAL_BLOCKS}", f"--train.run_dir={run_dir}",
           f"--checkpoint.interval={args.checkpoint_interval}",
           f"--train.spike_policy={'warn' if side == 'clean' else side}", f"--train.spike_z={args.z}", f"--train.spike_grad_z={args.grad_z}",
           f"--train.spike_window={args.window}", f"--optim.grad_clip={args.grad_clip}"]
    env = {"DIST_GPT_FAULT_POISON_AT": str(args.poison_at)} if side != "clean" else {}
    proc = subprocess.run(cmd, cwd=REPO, env={**_environ(), **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"spike_bench: {side} (seed {seed}) failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    final = json.loads((run_dir / "final.json").read_text())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spikes = [e for e in events if e.get("event") == "spike"]
    return {"val_loss": final["val_loss"], "spikes": len(spikes),
            "max_z": max((max(e["loss_z"], e["grad_norm_z"]) for e in spikes), default=None)}


def _environ() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.spike_bench", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps per run (default 600)")
    p.add_argument("--poison-at", type=int, default=325, help="the poisoned global batch (default 325: rollback goes back 25 steps to the checkpoint of step 300)")
    p.add_argument("--checkpoint-interval", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="optim.grad_clip (default 0, off: clipped to the recipe's 1.0, one poisoned batch barely moves the run)")
    p.add_argument("--recipe", choices=("classic", "modern"), default="classic", help="train.recipe (default classic)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per side (default 3)")
    p.add_argument("--z", type=float, default=6.0, help="train.spike_z (default 6)")
    p.add_argument("--grad-z", type=float, default=30.0, help="train.spike_grad_z (default 30)")
    p.add_argument("--window", type=int, default=100, help="train.spike_window (default 100)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=["clean", "off", "skip", "rollback"],
                   help="sides to run; clean is unpoisoned and runs spike_policy=warn to count false alarms")
    args = p.parse_args()
    if not 0 < args.poison_at < args.steps:
        p.error(f"--poison-at={args.poison_at} must lie inside the run (0 < P < --steps={args.steps})")
    results: dict[str, list[dict]] = {side: [] for side in args.policies}
    with tempfile.TemporaryDirectory(prefix="spike_bench-") as tmp:
        for seed in range(1337, 1337 + args.seeds):
            for side in args.policies:  # sides alternate within each seed
                results[side].append(run(side, seed, args, Path(tmp)))
                r = results[side][-1]
                print(f"  seed {seed} {side:8s} val loss {r['val_loss']:.4f}  spikes {r['spikes']}", flush=True)
    clean = statistics.mean(r["val_loss"] for r in results["clean"]) if "clean" in results else None
    print(f"\n{'side':10s} {'val loss':>9s} {'- clean':>8s} {'spikes':>7s} {'max z':>7s}   "
          f"({args.steps} steps, poison at {args.poison_at}, {args.seeds} seeds, mean)")
    for side, rs in results.items():
        loss = statistics.mean(r["val_loss"] for r in rs)
        diff = f"{loss - clean:+.4f}" if clean is not None else "n/a"
        zs = [r["max_z"] for r in rs if r["max_z"] is not None]
        print(f"{side:10s} {loss:9.4f} {diff:>8s} {sum(r['spikes'] for r in rs) / len(rs):7.1f} "
              f"{max(zs) if zs else float('nan'):7.1f}")


if __name__ == "__main__":
    main()
