"""Document-aware training on this machine: validation loss with and without blocks aligned to
document starts (data.align=document) and attention kept inside documents (model.doc_mask).

    python -m bench.doc_bench                                  # both corpora, 3 seeds (~40 min on 2 idle cores)
    python -m bench.doc_bench --corpus paragraphs --seeds 1    # one corpus, one seed
    python -m bench.doc_bench --results runs/doc_bench.json
    python -m bench.doc_bench --from-results runs/doc_bench.json   # report again, train nothing

Every run is the real training job (`python -m dist_gpt.train`, one process, one CPU thread) with
the `cpu` preset's modern recipe, as bench/recipe_bench.py runs it (4 layers, 4 heads, 128 wide,
batch 12, the trainer's default precision), at context 128 for STEPS steps, in four settings:

    plain        data.align=random,   model.doc_mask=false  (the default)
    align        data.align=document, model.doc_mask=false
    mask         data.align=random,   model.doc_mask=true
    align+mask   data.align=document, model.doc_mask=true

Validation loss is the mean over the whole validation split (the same fixed blocks for every
setting; a masked model is evaluated with its masks, as it is used), every EVAL_INTERVAL steps and
at the end. Wall time is training only, the sum of the trainer's per-step times
(`perf/step_time_ms`), as in recipe_bench. "Equal steps" compares the final losses; "equal time"
compares each run's loss, read off its curve (linear between evaluations), at the training time of
the seed's fastest setting. The settings run one after another in an order that rotates from seed
to seed, so that load from other users of a shared machine falls on all alike. Every figure printed
is the median over the seeds, differences first taken per seed against that seed's plain run.

Corpora (prepared once under --data-root, with their document indexes):
    stdlib       the Python standard library, byte level, one document per file (~18 KB: long
                 documents; validation 0.3% of the files), as recipe_bench prepares it
    paragraphs   the licence texts of bench/prose_corpus.py cut at blank lines, one document per
                 paragraph (258 characters on average: short documents), character level, 10% of
                 the documents for validation
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from bench.prose_corpus import check_size, write_corpus
from bench.recipe_bench import Run, _run_quiet, bench_arguments, describe_data, prepare_stdlib, train

STEPS = 250
EVAL_INTERVAL = 100
CONTEXT = 128
SETTINGS = {
    "plain": {"data.align": "random", "model.doc_mask": False},
    "align": {"data.align": "document", "model.doc_mask": False},
    "mask": {"data.align": "random", "model.doc_mask": True},
    "align+mask": {"data.align": "document", "model.doc_mask": True},
}
CORPORA = ("stdlib", "paragraphs")


def prepare_paragraphs(out: Path) -> Path:
    if not (out / "manifest.json").exists():
        corpus = out.with_name("paragraphs.jsonl")
        check_size(write_corpus(corpus, by_paragraph=True))
        _run_quiet([sys.executable, "-m", "tools.prepare", str(corpus), "--tokenizer", "char",
                    "--val-split", "0.1", "--out", str(out), "--quiet"])
    return out


def loss_at(run: Run, seconds: float) -> float:
    """The run's validation loss at `seconds` of training, linear between its evaluations."""
    points = list(zip(run.times, run.val))
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return run.val[-1]


def compare(data: Path, seeds: int, workdir: Path, threads: int, precision: str) -> dict:
    runs: list[Run] = []
    names = list(SETTINGS)
    for seed in range(seeds):
        order = names[seed % len(names):] + names[:seed % len(names)]
        for name in order:
            started = time.perf_counter()
            overrides = {"model.block_size": CONTEXT, **SETTINGS[name]}
            r = train(Run(name, "modern", seed, STEPS, overrides), data, workdir, threads, precision, EVAL_INTERVAL)
            print(f"  {data.name} seed {seed} {name:10s}: val {r.final:.4f}, {r.train_s:6.1f} s training "
                  f"({r.step_ms:.1f} ms/step), {time.perf_counter() - started:.0f} s in all", flush=True)
            runs.append(r)
    return summarize(data, runs)


def summarize(data: Path, runs: list[Run]) -> dict:
    med = statistics.median
    seeds = sorted({r.seed for r in runs})
    table = {}
    for name in SETTINGS:
        per_seed = []
        for seed in seeds:
            mine = {r.label: r for r in runs if r.seed == seed}
            equal_time = min(r.train_s for r in mine.values())
            per_seed.append({"final": mine[name].final, "train_s": mine[name].train_s, "step_ms": mine[name].step_ms,
                             "at_equal_time": loss_at(mine[name], equal_time), "equal_time_s": equal_time,
                             "d_steps": mine[name].final - mine["plain"].final,
                             "d_time": loss_at(mine[name], equal_time) - loss_at(mine["plain"], equal_time)})
        table[name] = {key: med([row[key] for row in per_seed]) for key in per_seed[0]}
        table[name]["per_seed_d_time"] = [row["d_time"] for row in per_seed]
        table[name]["per_seed_d_steps"] = [row["d_steps"] for row in per_seed]
    return {"corpus": data.name, "data": describe_data(data), "seeds": seeds, "steps": STEPS, "context": CONTEXT,
            "settings": table, "curves": [r.__dict__ for r in runs]}


def report(s: dict) -> None:
    print(f"\n== {s['corpus']}: {s['data']}; {s['steps']} steps at context {s['context']}, "
          f"medians of {len(s['seeds'])} seeds")
    print(f"{'setting':11s} {'ms/step':>8s} {'train s':>8s} {'val (steps)':>12s} {'vs plain':>9s} "
          f"{'val (time)':>11s} {'vs plain':>9s}   per seed vs plain at equal time")
    for name, r in s["settings"].items():
        seeds = ", ".join(f"{d:+.4f}" for d in r["per_seed_d_time"])
        print(f"{name:11s} {r['step_ms']:8.1f} {r['train_s']:8.1f} {r['final']:12.4f} {r['d_steps']:+9.4f} "
              f"{r['at_equal_time']:11.4f} {r['d_time']:+9.4f}   {seeds}")


def main(argv: list[str] | None = None) -> None:
    args = bench_arguments(__doc__, CORPORA, REPO / "data" / "doc_bench").parse_args(argv)
    if args.from_results:
        for path in args.from_results:
            for s in json.loads(path.read_text()).values():
                report(s)
        return
    corpora = CORPORA if args.corpus == "both" else (args.corpus,)
    prepare = {"stdlib": prepare_stdlib, "paragraphs": prepare_paragraphs}
    datasets = [prepare[name](args.data_root / name) for name in corpora]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="doc_bench_"))
    started = time.perf_counter()
    try:
        summaries = [compare(d, args.seeds, workdir, args.threads, args.precision) for d in datasets]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for s in summaries:
        report(s)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({s["corpus"]: s for s in summaries}, indent=1))
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
