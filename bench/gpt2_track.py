"""The single-GPU time-to-target track: GPT-2 small trained on FineWeb-style shards until its
validation loss reaches a target, over several seeds; tokens/s, MFU and time to target as mean ± std.

    # once: tokenize FineWeb's parquet files with GPT-2's tokenizer (tiktoken, or its tokenizer.json)
    python -m tools.prepare fineweb/ --include "*.parquet" --tokenizer gpt2 --out data/fineweb_gpt2
    # the track: one GPU, 3 seeds, stop each at validation loss 3.28 (nats per GPT-2 token)
    python -m bench.gpt2_track --data.path=data/fineweb_gpt2 --target 3.28 --seeds 0 1 2
    python -m bench.gpt2_track ... --max-steps 6000 --eval-every 125 --eval.max_blocks=4096 --recipe classic
    # tiny, on a CPU (what the test runs)
    python -m bench.gpt2_track --preset debug --data.path=data/stdlib --target 3.0 --seeds 0 1 --max-steps 200

Every `--section.key=value`, `--preset` (default gpt2-124m), `--recipe` and `--config` means what it
means to `python -m dist_gpt.train`; the rest are the track's own (see --help). Each seed is a process
of its own that builds the real trainer (`dist_gpt.training.trainer.build`, a scratch run directory, no
checkpoints) and takes `Trainer.step()` until the validation loss (the trainer's own evaluator, a
fixed set of `eval.max_blocks` validation blocks) is at or below `--target`, checked every
`--eval-every` steps, or `--max-steps` pass. The LR schedule is the one of a `--max-steps` run.

Time to target is the wall time of the training steps up to the evaluation that reached the target,
torch.compile's first steps included and evaluations excluded (as modded-nanogpt times its runs);
tokens/s and MFU are measured over the steps after the first `--warmup`. The table goes to stdout,
the JSON (every seed and the summary) to `--json` (default OUT/track.json, OUT from --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=float, required=True, help="validation loss to reach (nats per token)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each run (default 0 1 2)")
    p.add_argument("--max-steps", type=int, default=10_000, help="give up on a seed after this many steps")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation checks")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens/s and MFU")
    p.add_argument("--out", type=Path, default=Path("runs/gpt2_track"), help="folder for the runs and the JSON")
    p.add_argument("--json", type=Path, help="where to write the JSON (default OUT/track.json)")
    p.add_argument("--one-seed", type=int, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.max_steps < 1 or args.eval_every < 1:
        p.error("--max-steps and --eval-every must be at least 1")
    if not any(a == "--preset" or a.startswith("--preset=") for a in rest):
        rest = ["--preset", "gpt2-124m", *rest]
    return args, rest


def one_seed(args, config_argv: list[str]) -> dict:
    """Train one seed to the target in this process; its figures."""
    import torch

    from dist_gpt import config as config_mod
    from dist_gpt.parallel import dist
    from dist_gpt.training.faults import Verdict
    from dist_gpt.training.signals import StopSignals
    from dist_gpt.metrics import QuietLogger, mfu, resolve_peak_flops
    from dist_gpt.training.trainer import build

    argv = [*config_argv, f"--train.seed={args.one_seed}", f"--train.steps={args.max_steps}",
            "--log.tensorboard=false", "--eval.sample_tokens=0"]
    cfg = config_mod.parse(argv, world=dist.launch_world())
    env = dist.init(cfg.train.device, cfg.train.timeout_s, cfg.train.threads, cfg.parallel.data)
    cfg.train.run_dir = str(args.out.resolve() / f"seed{args.one_seed}")
    cfg.checkpoint.interval, cfg.checkpoint.resume = 0, "none"
    t = build(cfg, env, StopSignals(), log=QuietLogger(cfg.log, cfg.train.steps))
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    train_s, warm_s = 0.0, None  # seconds of training steps in all; of the first --warmup of them
    loss = float("nan")
    while t.state.step < args.max_steps:
        t0 = time.perf_counter()
        for _ in range(min(args.eval_every, args.max_steps - t.state.step)):
            if t.step() is not Verdict.PROCEED:
                raise SystemExit(f"error: seed {args.one_seed}: non-finite loss at step {t.state.step}; "
                                 "lower --optim.lr or use --train.precision=fp32")
            if t.state.step == args.warmup:
                sync()
                warm_s = train_s + time.perf_counter() - t0
        sync()
        train_s += time.perf_counter() - t0
        loss = t.evaluator.run(t.state.step)
        if loss <= args.target:
            break
    steady_steps = t.state.step - args.warmup
    tokens_per_s = (t.tokens_per_step * steady_steps / (train_s - warm_s)
                    if warm_s is not None and steady_steps > 0 else float("nan"))
    util = mfu(t.model.flops_per_token(), tokens_per_s, resolve_peak_flops(cfg.log, env.device, t.precision.name))
    return {"seed": args.one_seed, "reached": loss <= args.target, "steps": t.state.step,
            "tokens": t.state.tokens, "val_loss": round(loss, 4), "time_to_target_s": round(train_s, 2),
            "tokens_per_s": round(tokens_per_s, 1), "mfu": None if util is None else round(util, 4),
            "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
            "precision": t.precision.name, "model": f"{cfg.model.n_layer}x{cfg.model.n_head}x{cfg.model.n_embd}"}


def run_seed(seed: int, argv: list[str]) -> dict:
    """One seed in a process of its own (nothing compiled or allocated carries over to the next)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench.gpt2_track", *argv, "--one-seed", str(seed)],
                          cwd=Path.cwd(), env=env, stdout=subprocess.PIPE, text=True)
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise SystemExit(proc.returncode or 1)  # the child printed its one-line error
    return json.loads(results[-1])


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[dict], target: float) -> dict:
    """Mean ± sample standard deviation over the seeds; time and steps over the seeds that reached the target."""
    reached = [r for r in runs if r["reached"]]
    return {"target": target, "seeds": len(runs), "reached": len(reached),
            "time_to_target_s": mean_std([r["time_to_target_s"] for r in reached]),
            "steps_to_target": mean_std([r["steps"] for r in reached]),
            "tokens_per_s": mean_std([r["tokens_per_s"] for r in runs]),
            "mfu": mean_std([r["mfu"] for r in runs]),
            "val_loss": mean_std([r["val_loss"] for r in runs])}


def _pm(stat: dict, fmt: str) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def table(runs: list[dict], summary: dict) -> str:
    rows = [f"{'seed':>6} {'reached':>7} {'steps':>7} {'val loss':>9} {'time to target':>15} {'tokens/s':>12} {'MFU':>7}"]
    for r in runs:
        mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        time_text = f"{r['time_to_target_s']:.1f} s" if r["reached"] else "-"
        rows.append(f"{r['seed']:>6} {'yes' if r['reached'] else 'no':>7} {r['steps']:>7} {r['val_loss']:>9.4f} "
                    f"{time_text:>15} {r['tokens_per_s']:>12,.0f} {mfu_text:>7}")
    s = summary
    rows.append(f"target {s['target']}: reached by {s['reached']} of {s['seeds']} seeds; time to target "
                f"{_pm(s['time_to_target_s'], '.1f')} s, steps {_pm(s['steps_to_target'], '.0f')}, tokens/s "
                f"{_pm(s['tokens_per_s'], ',.0f')}, MFU {_pm(s['mfu'], '.4f')} (mean ± std over seeds)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, config_argv = parse(argv)
    if args.one_seed is not None:
        from dist_gpt.parallel.dist import exit_code

        def child(_):
            print("RESULT " + json.dumps(one_seed(args, config_argv)), flush=True)
            return 0

        code = exit_code(child, [])  # a bad option or dataset: its one line, exit 2
        sys.stdout.flush()
        os._exit(code)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, argv))
        r = runs[-1]
        print(f"seed {seed}: {'reached' if r['reached'] else 'did not reach'} {args.target} at step {r['steps']} "
              f"(val loss {r['val_loss']}, {r['time_to_target_s']} s, {r['tokens_per_s']:,.0f} tokens/s)", flush=True)
    summary = summarize(runs, args.target)
    print(table(runs, summary))
    path = args.json or args.out / "track.json"
    path.write_text(json.dumps({"command": "python -m bench.gpt2_track " + " ".join(argv), "runs": runs,
                                "summary": summary}, indent=2) + "\n")
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
