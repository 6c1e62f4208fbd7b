"""Mixtures of two corpora at equal steps: each source's validation loss under five mixtures.

    python -m bench.mix_bench                               # 5 mixtures x 3 seeds (~25 min on 2 busy shared cores)
    python -m bench.mix_bench --seeds 1 --steps 100         # a quick look
    python -m bench.mix_bench --results runs/mix_bench.json # also keep every number as JSON
    python -m bench.mix_bench --step-time                   # ms/step: one dataset against a 3-source mixture

Two corpora this machine has, both byte level so that they share one tokenizer (prepared once
under --data-root, data/mix_bench):
    code    the Python standard library's source (tools.prepare --source stdlib, validation 0.3% of the files)
    prose   ~1.25 MB of licence texts found on this machine (bench/prose_corpus.py; validation 10% of the documents)

Each mixture trains the same model (2 layers, 4 heads, 64 wide, context 64, batch 16), the
`cpu` preset's modern recipe, for the same number of steps from the same initial weights, with
data.mix naming both sources (a weight of 0 leaves a source out of training but not out of the
evaluation):
    code-only   code 1, prose 0
    prose-only  code 0, prose 1
    natural     weights proportional to the corpora's training tokens (what concatenating them gives)
    50-50       code 0.5, prose 0.5
    anneal      50-50, then prose alone for the last 20% of the steps (data.mix_phases)
`--step-time` instead trains the same model for --steps steps on the code corpus alone and on a
3-source mixture (code 0.5, prose 0.3, and the code corpus again under a third name 0.2), runs
alternating, --seeds rounds, and prints each side's median ms/step and share of the step spent
waiting for data (perf/step_time_ms and perf/data_wait_share, the first 10 steps left out).

Every run is evaluated once at the end on EVAL_BLOCKS validation blocks of each source
(val/code/loss and val/prose/loss, nats per token = per byte). The table prints each source's
mean over the seeds and the spread (max - min). Runs use one CPU thread each, fp32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.prose_corpus import check_size, write_corpus  # noqa: E402

SHAPE = ["--model.n_layer=2", "--model.n_head=4", "--model.n_embd=64", "--model.block_size=64",
         "--train.global_batch=16", "--train.micro_batch=16"]
COMMON = ["--preset", "cpu", "--train.precision=fp32", "--eval.sample_tokens=0", "--log.tensorboard=false",
          "--checkpoint.interval=0", "--checkpoint.keep_best=false", "--eval.interval=0", "--eval.at_start=false",
          "--log.interval=50", "--resume", "none"]
EVAL_BLOCKS = 256
MIXTURES = ("code-only", "prose-only", "natural", "50-50", "anneal")


def prepare(root: Path) -> tuple[Path, Path]:
    code, prose = root / "code", root / "prose"
    if not (code / "manifest.json").exists():
        _run([sys.executable, "-m", "tools.prepare", "--source", "stdlib", "--tokenizer", "byte",
              "--val-split", "0.003", "--out", str(code), "--quiet"])
    if not (prose / "manifest.json").exists():
        corpus = root / "prose.jsonl"
        check_size(write_corpus(corpus))
        _run([sys.executable, "-m", "tools.prepare", str(corpus), "--tokenizer", "byte", "--val-split", "0.1",
              "--out", str(prose), "--quiet"])
    return code, prose


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")


def train_tokens(path: Path) -> int:
    return json.loads((path / "manifest.json").read_text())["splits"]["train"]["num_tokens"]


def mixture_args(name: str, code: Path, prose: Path, steps: int) -> list[str]:
    natural = train_tokens(code) / (train_tokens(code) + train_tokens(prose))
    weights = {"code-only": (1, 0), "prose-only": (0, 1), "natural": (natural, 1 - natural),
               "50-50": (0.5, 0.5), "anneal": (0.5, 0.5)}[name]
    args = [f"--data.mix=code:{code}:{weights[0]},prose:{prose}:{weights[1]}"]
    if name == "anneal":
        args.append(f"--data.mix_phases={steps - steps // 5}:prose=1")
    return args


def train(name: str, seed: int, code: Path, prose: Path, steps: int, workdir: Path) -> dict:
    run_dir = workdir / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own scratch directory
    _run([sys.executable, "-m", "dist_gpt.train", *COMMON, *SHAPE, *mixture_args(name, code, prose, steps),
          f"--train.steps={steps}", f"--train.seed={seed}", "--train.threads=1", f"--eval.max_blocks={EVAL_BLOCKS}",
          f"--train.run_dir={run_dir}"])
    final = json.loads((run_dir / "final.json").read_text())
    return {"mixture": name, "seed": seed, **{f"{s}_val_loss": r["val_loss"] for s, r in final["sources"].items()},
            **{f"{s}_tokens": r["tokens"] for s, r in final["sources"].items()}}


def table(rows: list[dict]) -> str:
    lines = ["| mixture | code val loss | prose val loss | code tokens | prose tokens |", "|---|---|---|---|---|"]
    for name in MIXTURES:
        mine = [r for r in rows if r["mixture"] == name]
        if not mine:
            continue
        cells = []
        for source in ("code", "prose"):
            vals = [r[f"{source}_val_loss"] for r in mine]
            cells.append(f"{statistics.mean(vals):.4f} ± {(max(vals) - min(vals)) / 2:.4f}")
        cells += [f"{statistics.mean(r[f'{s}_tokens'] for r in mine) / 1e3:.0f}k" for s in ("code", "prose")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_times(code: Path, prose: Path, steps: int, rounds: int, workdir: Path) -> None:
    sides = {"one dataset": [f"--data.path={code}"],
             "3-source mixture": [f"--data.mix=code:{code}:0.5,prose:{prose}:0.3,again:{code}:0.2"]}
    got: dict[str, tuple[list, list]] = {name: ([], []) for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):  # alternating
            run_dir = workdir / f"step-{name.replace(' ', '-')}-{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            _run([sys.executable, "-m", "dist_gpt.train", *COMMON, *SHAPE, *sides[name], "--log.interval=1",
                  f"--train.steps={steps}", "--train.threads=1", "--eval.max_blocks=8", f"--train.run_dir={run_dir}"])
            for line in (run_dir / "metrics.jsonl").read_text().splitlines():
                rec = json.loads(line)
                if "perf/step_time_ms" in rec and rec["step"] > 10:
                    got[name][0].append(rec["perf/step_time_ms"])
                    got[name][1].append(rec["perf/data_wait_share"])
    for name, (ms, wait) in got.items():
        print(f"{name}: median {statistics.median(ms):.2f} ms/step, data wait {100 * statistics.median(wait):.2f}% "
              f"({len(ms)} steps over {rounds} runs)")
    ratio = statistics.median(got["3-source mixture"][0]) / statistics.median(got["one dataset"][0])
    print(f"mixture / one dataset: {ratio:.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mix_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data/mix_bench", help="where the two corpora are prepared")
    p.add_argument("--workdir", default="runs/mix_bench", help="run directories (replaced)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every run (default 400)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per mixture (default 3)")
    p.add_argument("--results", help="write every run's numbers to this JSON file")
    p.add_argument("--step-time", action="store_true", help="time training steps on one dataset against a mixture")
    args = p.parse_args(argv)
    code, prose = prepare(REPO / args.data_root)
    if args.step_time:
        return step_times(code, prose, args.steps, args.seeds, REPO / args.workdir)
    rows = []
    for seed in range(args.seeds):
        order = MIXTURES if seed % 2 == 0 else MIXTURES[::-1]  # machine load falls on every mixture alike
        for name in order:
            rows.append(train(name, seed, code, prose, args.steps, REPO / args.workdir))
            print(json.dumps(rows[-1]), flush=True)
            if args.results:
                Path(args.results).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{args.steps} steps x {16 * 64:,} tokens, {args.seeds} seeds; validation loss in nats/byte "
          f"(mean ± half the spread over the seeds), {EVAL_BLOCKS} blocks per source\n")
    print(table(rows))


if __name__ == "__main__":
    main()
