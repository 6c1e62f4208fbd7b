"""Classic vs modern training recipe: validation loss against training wall time, on this machine.

    python -m bench.recipe_bench                               # both corpora, 3 seeds (~35 min on 2 cores)
    python -m bench.recipe_bench --corpus prose --seeds 1      # one corpus, one seed
    python -m bench.recipe_bench --plot docs/recipes.png --results runs/recipe_bench.json
    python -m bench.recipe_bench --sweep --corpus stdlib       # the learning-rate sweeps (~9 min each)
    python -m bench.recipe_bench --from-results a.json b.json --plot docs/recipes.png   # report again

Every run is the real training job (`python -m dist_gpt.train`, one process) with `--recipe
classic` or `--recipe modern` as the `cpu` preset defines them (dist_gpt/presets.py, with their
learning rates, except where a corpus's sweep found a better one: TUNED), on the same model shape (4 layers, 4 heads, 128 wide, context 64), batch
(12 sequences), data order and initial seed, in the trainer's default precision (`auto`: bf16
autocast on a CPU with native bf16, else fp32):

    classic        2000 steps, the reference
    modern-long    MODERN_LONG_STEPS steps, about classic's time: the equal-time comparison
    modern-short   MODERN_SHORT_LADDER: schedules of growing length, run until one ends at or below
                   the classic run's final validation loss (each is a complete WSD schedule)

Validation loss is the mean over the whole validation split (`eval.max_blocks=none`: every block
once, no sampling), evaluated every EVAL_INTERVAL steps and at the end of every run. Wall time is
training only: the sum of the trainer's own per-step times (`perf/step_time_ms` in metrics.jsonl:
data, forward, backward, clipping, optimizer step), which leave out evaluation, checkpoints,
logging and start-up.

The time the modern recipe needs to reach the classic run's final validation loss is read off the
curve of the first modern-short schedule that gets there (linear between evaluations), or off
modern-long's if none does; the ratio is that time over the classic run's training time, per seed.
Every figure printed is the median over the seeds. Classic and modern-long swap order from one
seed to the next, so that load from other users of a shared machine falls on both recipes alike.

`--sweep` runs each recipe at four learning rates (CLASSIC_SWEEP: AdamW's; MODERN_SWEEP: Muon's,
AdamW's part staying at the preset's), classic at its 2000 steps and modern at
MODERN_SWEEP_STEPS (about where it reaches classic's loss), seed 0, recipes alternating, evaluated once at the end on the whole validation split.

Corpora (prepared once under --data-root):
    stdlib   the Python standard library's source, byte level (tools.prepare --source stdlib); its
             validation split is 0.3% of the files (5 files, 54 KB, instead of 5% and 1.9 MB) so
             that evaluating every block at every evaluation stays affordable
    prose    ~1.25 MB of licence texts found on this machine, character level (bench/prose_corpus.py
             says which, in which order; its validation split is 10% of the documents)

Runs use one CPU thread (--threads): this machine's 2 cores are shared, and there a 2-thread
matmul whose second thread waits for a core ran 5-10x slower than a 1-thread one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from bench.prose_corpus import check_size, write_corpus

CLASSIC_STEPS = 2000
MODERN_SHORT_LADDER = (300, 400, 500, 650, 850)
MODERN_LONG_STEPS = 1300
EVAL_INTERVAL = 200
SHAPE = ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=128", "--model.block_size=64",
         "--model.dropout=0", "--model.vocab_size=0", "--train.global_batch=12", "--train.micro_batch=12"]
# Logging every step gives every step's time; the console line is off the timed path.
# Eager, as every recorded sweep was run (train.compile=auto would compile runs long enough to repay it).
COMMON = ["--preset", "cpu", "--log.interval=1", "--log.tensorboard=false", "--train.compile=false",
          "--eval.max_blocks=none", "--eval.batch_size=64", "--eval.sample_tokens=0", "--checkpoint.interval=0"]
CORPORA = ("stdlib", "prose")

# The sweeps: four settings per recipe, one seed, each at the length it is used at.
CLASSIC_SWEEP = [{"optim.lr": lr} for lr in (1e-3, 2e-3, 4e-3, 8e-3)]
MODERN_SWEEP = [{"optim.muon_lr": lr} for lr in (0.0025, 0.005, 0.01, 0.02)]
MODERN_SWEEP_STEPS = 450  # about where modern reaches classic's 2000-step loss on the stdlib corpus
# Each corpus's best setting from its sweep (docs/RECIPES.md), where it differs from the cpu preset's
# (classic optim.lr 4e-3, modern optim.muon_lr 0.005): the comparison runs both recipes tuned.
TUNED = {"stdlib": {"classic": {}, "modern": {}},
         "prose": {"classic": {"optim.lr": 8e-3}, "modern": {}}}


# ---------------------------------------------------------------------------------------------
# Data

def prepare_stdlib(out: Path) -> Path:
    if not (out / "manifest.json").exists():
        _run_quiet([sys.executable, "-m", "tools.prepare", "--source", "stdlib", "--tokenizer", "byte",
                    "--val-split", "0.003", "--out", str(out), "--quiet"])
    return out


def prepare_prose(out: Path) -> Path:
    if not (out / "manifest.json").exists():
        corpus = out.with_name("prose.jsonl")
        check_size(write_corpus(corpus))
        _run_quiet([sys.executable, "-m", "tools.prepare", str(corpus), "--tokenizer", "char",
                    "--val-split", "0.1", "--out", str(out), "--quiet"])
    return out


def describe_data(path: Path) -> str:
    m = json.loads((path / "manifest.json").read_text())
    train, val = m["splits"]["train"], m["splits"]["val"]
    return (f"{m['tokenizer']['name']} tokens, vocab {m['vocab_size']}, train {train['num_tokens']:,}, "
            f"val {val['num_tokens']:,} tokens in {val['documents']} documents")


def _run_quiet(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------
# One training run

@dataclass
class Run:
    label: str
    recipe: str
    seed: int
    steps: int
    overrides: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)   # training seconds before each evaluation
    val: list[float] = field(default_factory=list)     # whole-split validation loss (nats/token)
    step_ms: float = 0.0                               # median time of one training step

    @property
    def final(self) -> float:
        return self.val[-1]

    @property
    def train_s(self) -> float:
        return self.times[-1]

    def time_to_reach(self, target: float) -> float | None:
        """Training seconds until the validation loss first reaches `target`, linear between evaluations."""
        for i, (t, v) in enumerate(zip(self.times, self.val)):
            if v <= target:
                if i == 0:
                    return t
                t0, v0 = self.times[i - 1], self.val[i - 1]
                return t0 + (t - t0) * (v0 - target) / (v0 - v)
        return None


def train(run: Run, data: Path, workdir: Path, threads: int, precision: str,
          eval_interval: int = EVAL_INTERVAL) -> Run:
    run_dir = workdir / f"{data.name}-{run.label}-seed{run.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own scratch directory
    evals = [f"--eval.interval={eval_interval}"] if eval_interval else ["--eval.interval=0", "--eval.at_start=false"]
    cmd = [sys.executable, "-m", "dist_gpt.train", *COMMON, *SHAPE, *evals, "--recipe", run.recipe,
           f"--train.steps={run.steps}", f"--train.seed={run.seed}", f"--train.threads={threads}",
           f"--train.precision={precision}",
           f"--data.path={data}", f"--train.run_dir={run_dir}",
           *[f"--{k}={v}" for k, v in run.overrides.items()]]
    _run_quiet(cmd)
    step_ms, val = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "perf/step_time_ms" in rec:
            step_ms[rec["step"]] = rec["perf/step_time_ms"]
        if "val/loss" in rec:
            val[rec["step"]] = rec["val/loss"]
    assert sorted(step_ms) == list(range(1, run.steps + 1)), f"{run_dir}: a step's time is missing"
    elapsed, cumulative = 0.0, {0: 0.0}
    for step in range(1, run.steps + 1):
        elapsed += step_ms[step] / 1000
        cumulative[step] = elapsed
    run.times = [cumulative[s] for s in sorted(val)]
    run.val = [val[s] for s in sorted(val)]
    run.step_ms = statistics.median(step_ms.values())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run


# ---------------------------------------------------------------------------------------------
# The comparison

def compare(data: Path, seeds: int, workdir: Path, threads: int, precision: str) -> dict:
    runs: list[Run] = []

    def run(label: str, recipe: str, seed: int, steps: int) -> Run:
        started = time.perf_counter()
        r = train(Run(label, recipe, seed, steps, dict(TUNED[data.name][recipe])), data, workdir, threads, precision)
        print(f"  {data.name} seed {seed} {label:12s} {steps:5d} steps: val {r.final:.4f}, {r.train_s:6.1f} s "
              f"training ({r.step_ms:.1f} ms/step), {time.perf_counter() - started:.0f} s in all", flush=True)
        runs.append(r)
        return r

    for seed in range(seeds):
        pair = [("classic", "classic", CLASSIC_STEPS), ("modern-long", "modern", MODERN_LONG_STEPS)]
        done = {label: run(label, recipe, seed, steps) for label, recipe, steps in (pair if seed % 2 == 0 else pair[::-1])}
        for steps in MODERN_SHORT_LADDER:  # the shortest modern schedule that gets there
            if run("modern-short", "modern", seed, steps).final <= done["classic"].final:
                break
    return summarize(data, runs)


def summarize(data: Path, runs: list[Run]) -> dict:
    """Per seed: the ratio (from the first ladder run that reached classic's final loss, else from
    modern-long's curve) and the equal-time difference; then medians over the seeds."""
    med = statistics.median
    seeds = sorted({r.seed for r in runs})
    rows = []
    for seed in seeds:
        mine = [r for r in runs if r.seed == seed]
        classic = next(r for r in mine if r.label == "classic")
        long = next(r for r in mine if r.label == "modern-long")
        short = [r for r in mine if r.label == "modern-short"][-1]  # the ladder stopped at this one
        source = short if short.final <= classic.final else long
        reach = source.time_to_reach(classic.final)
        rows.append({"seed": seed, "classic": classic, "short": short, "long": long,
                     "ratio": None if reach is None else reach / classic.train_s,
                     "ratio_from": f"{source.label} {source.steps} steps"})
    table = {label: {"steps": [row[key].steps for row in rows],
                     "final_val": med([row[key].final for row in rows]),
                     "train_s": med([row[key].train_s for row in rows]),
                     "step_ms": med([row[key].step_ms for row in rows]),
                     "per_seed_final_val": [row[key].final for row in rows]}
             for label, key in (("classic", "classic"), ("modern-short", "short"), ("modern-long", "long"))}
    ratios = [row["ratio"] for row in rows]
    return {
        "corpus": data.name, "data": describe_data(data), "seeds": seeds, "runs": table,
        "ratio": med(ratios) if None not in ratios else None,
        "per_seed_ratio": ratios, "ratio_from": [row["ratio_from"] for row in rows],
        "equal_time_difference": med([row["long"].final - row["classic"].final for row in rows]),
        "curves": [asdict(r) for r in runs],
    }


def _median_curve(curves: list[dict]) -> list[tuple[float, float]]:
    return [(statistics.median(ts), statistics.median(vs))
            for ts, vs in zip(zip(*[c["times"] for c in curves]), zip(*[c["val"] for c in curves]))]


def report(s: dict) -> None:
    print(f"\n== {s['corpus']}: {s['data']}")
    tuned = {c["label"]: c["overrides"] for c in s["curves"] if c["overrides"]}  # as the runs were made
    print("tuned settings beyond the cpu preset's: " + (", ".join(f"{label} {o}" for label, o in tuned.items()) or "none"))
    print(f"{'run':14s} {'steps':>14s} {'train s':>8s} {'ms/step':>8s} {'final val':>10s}   "
          f"(medians of {len(s['seeds'])} seeds)")
    for label, r in s["runs"].items():
        steps = "/".join(str(n) for n in sorted(set(r["steps"]), key=r["steps"].index))
        print(f"{label:14s} {steps:>14s} {r['train_s']:8.1f} {r['step_ms']:8.1f} {r['final_val']:10.4f}")
    print("validation loss against training seconds:")
    for label in ("classic", "modern-long"):
        points = _median_curve([c for c in s["curves"] if c["label"] == label])
        print(f"  {label:12s} (median) " + "  ".join(f"{t:.0f}s:{v:.3f}" for t, v in points))
    for c in s["curves"]:
        if c["label"] == "modern-short":
            print(f"  modern-short {c['steps']:4d} steps, seed {c['seed']}: "
                  + "  ".join(f"{t:.0f}s:{v:.3f}" for t, v in zip(c["times"], c["val"])))
    classic = s["runs"]["classic"]
    ratios = ", ".join("never" if r is None else f"{100 * r:.1f}% ({src})"
                       for r, src in zip(s["per_seed_ratio"], s["ratio_from"]))
    if s["ratio"] is None:
        print(f"modern did not reach classic's final val {classic['final_val']:.4f} in every seed: {ratios}")
    else:
        print(f"modern reaches classic's final val {classic['final_val']:.4f} in {100 * s['ratio']:.1f}% of classic's "
              f"training time {classic['train_s']:.1f} s; per seed: {ratios}")
    long = s["runs"]["modern-long"]
    print(f"equal wall time: modern-long {long['final_val']:.4f} after {long['train_s']:.1f} s vs classic "
          f"{classic['final_val']:.4f} after {classic['train_s']:.1f} s (difference {s['equal_time_difference']:+.4f})")


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"classic": "tab:blue", "modern-short": "tab:red", "modern-long": "tab:orange"}
    fig, axes = plt.subplots(1, len(summaries), figsize=(6.5 * len(summaries), 4.5), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        last_short = {c["seed"]: c for c in s["curves"] if c["label"] == "modern-short"}
        for c in s["curves"]:
            if c["label"] == "modern-short" and c is not last_short[c["seed"]]:
                continue  # the ladder's shorter schedules that did not get there
            first = c["seed"] == 0
            ax.plot(c["times"], c["val"], color=colours[c["label"]], alpha=0.8 if first else 0.35, lw=1.3,
                    label=f"{c['label']} ({c['steps']} steps)" if first else None)
        target = s["runs"]["classic"]["final_val"]
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"classic final {target:.3f}")
        if s["ratio"] is not None:
            ax.axvline(s["ratio"] * s["runs"]["classic"]["train_s"], color="grey", ls=":", lw=0.8,
                       label=f"modern reaches it: {100 * s['ratio']:.0f}% of the time")
        finals = [v for c in s["curves"] for v in c["val"][-1:]]
        ax.set_ylim(min(finals) - 0.1, max(finals) + 0.9)
        ax.set_title(f"{s['corpus']} ({s['data'].split(',')[0]})")
        ax.set_xlabel("training wall time, s (evaluation excluded)")
        ax.set_ylabel("validation loss, whole split (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------
# The learning-rate sweeps

def sweep(data: Path, workdir: Path, threads: int, precision: str) -> dict:
    """Each recipe's four settings (classic at CLASSIC_STEPS, modern at MODERN_SWEEP_STEPS), seed 0, alternating;
    evaluated once, at the end, on the whole validation split."""
    results = {"classic": [], "modern": []}
    for i, (c, m) in enumerate(zip(CLASSIC_SWEEP, MODERN_SWEEP)):
        pair = [Run("sweep-classic", "classic", 0, CLASSIC_STEPS, c), Run("sweep-modern", "modern", 0, MODERN_SWEEP_STEPS, m)]
        for run in pair if i % 2 == 0 else pair[::-1]:
            train(run, data, workdir, threads, precision, eval_interval=0)
            results[run.recipe].append({"overrides": run.overrides, "final_val": run.final, "train_s": run.train_s})
            print(f"  {data.name} {run.recipe:7s} {run.steps:5d} steps {run.overrides}: val {run.final:.4f} "
                  f"({run.train_s:.0f} s)", flush=True)
    for recipe, rows in results.items():
        best = min(rows, key=lambda r: r["final_val"])
        print(f"{data.name} {recipe}: best {best['overrides']} -> {best['final_val']:.4f}")
    return results


def bench_arguments(doc: str, corpora: tuple[str, ...], data_root: Path) -> argparse.ArgumentParser:
    """The options this benchmark and bench/doc_bench.py share."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=(*corpora, "both"), default="both")
    p.add_argument("--seeds", type=int, default=3, help="seeds per run (default 3; every figure is their median)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1, see the docstring)")
    p.add_argument("--precision", default="auto", help="train.precision of every run (default auto, the trainer's)")
    p.add_argument("--data-root", type=Path, default=data_root)
    p.add_argument("--workdir", type=Path, default=None, help="run directories (default: a temporary one)")
    p.add_argument("--results", type=Path, help="write every curve and summary as JSON here")
    p.add_argument("--from-results", type=Path, nargs="+", metavar="JSON",
                   help="train nothing: report the summaries in these --results files")
    return p


def main(argv: list[str] | None = None) -> None:
    p = bench_arguments(__doc__, CORPORA, REPO / "data" / "recipe_bench")
    p.add_argument("--plot", type=Path, help="draw validation loss against wall time into this PNG (also with --from-results)")
    p.add_argument("--sweep", action="store_true", help="run the learning-rate sweeps instead")
    args = p.parse_args(argv)
    if args.from_results:
        summaries = [s for path in args.from_results for s in json.loads(path.read_text()).values()]
        for s in summaries:
            report(s)
        if args.plot:
            plot(summaries, args.plot)
            print(f"plot: {args.plot}")
        return

    corpora = CORPORA if args.corpus == "both" else (args.corpus,)
    prepare = {"stdlib": prepare_stdlib, "prose": prepare_prose}
    datasets = [prepare[name](args.data_root / name) for name in corpora]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="recipe_bench_"))
    started = time.perf_counter()
    try:
        if args.sweep:
            out = {d.name: sweep(d, workdir, args.threads, args.precision) for d in datasets}
        else:
            summaries = [compare(d, args.seeds, workdir, args.threads, args.precision) for d in datasets]
            for s in summaries:
                report(s)
            out = {s["corpus"]: s for s in summaries}
            if args.plot:
                plot(summaries, args.plot)
                print(f"plot: {args.plot}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(out, indent=1))
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
