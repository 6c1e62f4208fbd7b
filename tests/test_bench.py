"""The training benchmark in CI size: it runs dist_gpt's real step and its reference, and prints
every figure. Nothing here is timed: speed targets are checked by running the benchmark itself
(docs/PERFORMANCE.md), never by a test on a shared machine."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys

import pytest
import torch

from bench.reference_gpt import ReferenceGPT, ReferenceTrainer
from conftest import REPO, _env, run_train
from dist_gpt import config as config_mod
from dist_gpt.model.gpt import GPT
from dist_gpt.optim.optimizers import LRSchedule, build_optimizers
from dist_gpt.parallel.precision import Precision
from dist_gpt.training.trainer import optimizer_step

BENCH = "bench.train_bench"
# one thread: on a shared CI machine two OpenMP threads per process wait on each other (see docs)
SMALL = ["--preset", "debug", "--steps", "6", "--warmup", "2", "--chunk", "2", "--train.threads=1"]


def _row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label + " "))
    return line.split()


def test_compare_prints_every_figure_profiles_and_evaluates(tiny_data, tmp_path):
    prof = tmp_path / "profile"
    out = run_train([*SMALL, f"--data.path={tiny_data}", "--compare", "reference", "dist_gpt",
                     "--eval-full", "--profile", str(prof)], module=BENCH).stdout
    header = next(line for line in out.splitlines() if line.startswith("side"))
    for column in ("tokens/s", "best", "ms/step", "MFU", "data wait", "warm-up", "peak mem"):
        assert column in header
    for label, name in (("A", "reference"), ("B", "dist_gpt")):
        row = _row(out, label)
        assert row[1] == name
        tokens, best, ms = float(row[2].replace(",", "")), float(row[3].replace(",", "")), float(row[4])
        assert 0 < tokens <= best and ms > 0
        assert row[5] == "n/a"  # MFU: no peak is known for a CPU
        assert row[6].endswith("%") and row[7].endswith("s") and row[8] != "n/a"
    ratio = re.search(r"ratio B/A \(tokens/s\): ([\d.]+) median of 2 alternating rounds .* fastest chunks: ([\d.]+)", out)
    assert ratio and float(ratio.group(1)) > 0
    losses = re.search(r"whole-validation-split loss \(fp32\): A ([\d.]+), B ([\d.]+)", out)
    assert losses and all(0 < float(v) < 6 for v in losses.groups())  # ln(256) = 5.55 at the start

    # a trace per side that TensorBoard's profiler plugin opens (Chrome trace JSON), with the phases
    for side in ("A-reference", "B-dist_gpt"):
        (trace,) = (prof / side).glob("*.pt.trace.json")
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert {"data", "optimizer"} <= names
        assert {"forward", "backward"} <= names if side.startswith("B") else "forward_backward" in names
    split = [line for line in out.splitlines() if line.strip().startswith("data ")]
    assert len(split) == 2 and all("forward" in s and "backward" in s and "optimizer" in s for s in split)
    assert "agree" in split[1]  # dist_gpt's step includes the stop/NaN agreement


def test_config_overrides_as_sides_and_a_clear_error(tiny_data):
    out = run_train([*SMALL, f"--data.path={tiny_data}", "--recipe", "classic",
                     "--compare", "train.precision=fp32", "train.precision=bf16,optim.grad_clip=0.5"],
                    module=BENCH).stdout
    assert _row(out, "A")[1] == "train.precision=fp32" and "precision fp32" in out
    assert "optim adamw" in out and "recipe classic" in out
    bad = run_train([*SMALL, f"--data.path={tiny_data}", "--compare", "reference", "train.nonsense=1"],
                    module=BENCH, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown option --train.nonsense")
    assert "Traceback" not in bad.stderr



def test_modern_steady_records_every_step_and_splits_the_modern_step(tiny_data):
    """`--modern-steady` at a tiny size: classic and modern at both pinned precisions, every step
    recorded (2 rounds x 2 steps per side), the ratios, the histograms and each step's phases."""
    out = run_train(["--modern-steady", "--preset", "debug", f"--data.path={tiny_data}", "--model.block_size=32",
                     "--train.global_batch=4", "--train.micro_batch=4", "--steps", "5", "--warmup", "1",
                     "--chunk", "2", "--breakdown", "2"], module=BENCH).stdout
    assert "1 threads/rank" in out and "context 32" in out
    for name in ("classic bf16", "modern bf16", "classic fp32", "modern fp32"):
        row = next(line for line in out.splitlines() if line.startswith(name + " ")).split()
        assert row[2] == "4" and float(row[3]) > 0 and float(row[4]) >= 1.0  # 4 steps; p90 >= the median
        hist = next(line for line in out.splitlines() if re.match(rf"\s+{name}\s+<=0.9 ", line))
        assert sum(int(n) for n in re.findall(r" (\d+)(?= \||$)", hist)) == 4  # every step in one bin
    for prec in ("bf16", "fp32"):
        assert re.search(rf"modern/classic {prec}: [\d.]+ \(median of 2 rounds", out)
        for recipe in ("classic", "modern"):
            phases = next(line for line in out.splitlines() if re.match(rf"\s+{recipe} {prec}\s+forward ", line))
            ms = dict(re.findall(r"(\w+) ([\d.-]+)", phases))
            assert set(ms) == {"forward", "backward", "newton_schulz", "optimizer_rest", "other", "total"}
            assert float(ms["forward"]) > 0 and float(ms["backward"]) > 0
            assert (float(ms["newton_schulz"]) > 0) == (recipe == "modern")  # Muon's only

@pytest.mark.slow
def test_two_processes_through_torchrun(tiny_data):
    out = run_train(["--preset", "debug", "--steps", "4", "--warmup", "1", "--chunk", "1",
                     f"--data.path={tiny_data}", "--compare", "reference", "dist_gpt"],
                    nproc=2, module=BENCH).stdout
    assert "world 2" in out and "2 micro x 2 accum x 2 ranks" in out
    assert out.count("ratio B/A") == 1  # rank 0 reports, once
    assert float(_row(out, "B")[2].replace(",", "")) > 0


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reference_is_the_classic_recipe_step_for_step(one_thread):
    """Same initial weights, same batches, fp32: the reference and dist_gpt's classic step agree,
    so a comparison measures speed and numerics, not a different model or optimizer."""
    cfg = config_mod.build("debug", overrides={"train.recipe": "classic", "train.steps": 8, "optim.warmup_steps": 2})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    ref = ReferenceGPT(cfg.model.vocab_size, cfg.model.block_size, cfg.model.n_layer, cfg.model.n_head,
                       cfg.model.n_embd)
    ref.load_dist_gpt_weights(model.state_dict())
    o = cfg.optim
    trainer = ReferenceTrainer(ref, o.lr, o.weight_decay, (o.beta1, o.beta2), o.warmup_steps, cfg.train.steps,
                               o.min_lr_ratio, o.grad_clip)
    optimizers = build_optimizers(model, o, "cpu", exact=True)
    schedule, precision = LRSchedule(o, cfg.train.steps), Precision("fp32", "cpu")
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for step in range(cfg.train.steps):
        x, y = torch.randint(0, 256, (2, 4, cfg.model.block_size), generator=gen)
        schedule.apply(optimizers, step)
        ours = model(x, y)
        ours.backward()
        optimizer_step(params, optimizers, precision.scaler, o.grad_clip)
        theirs = trainer.step([(x, y)])
        assert abs(ours.item() - theirs.item()) < 1e-5 * abs(theirs.item()), step
        assert optimizers[0].param_groups[0]["lr"] == pytest.approx(trainer.optimizer.param_groups[0]["lr"])


HEAP = """
import ctypes, sys, torch
from dist_gpt.parallel import dist
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                              "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "init":
    dist.init("cpu", threads=1)
t = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # an activation-sized block, 16 MiB
held = libc.mallinfo2()
del t
freed = libc.mallinfo2()
print(held.hblkhd, held.arena, freed.arena)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_cpu_steps_keep_freed_memory_mapped():
    """After dist.init on CPU, a block the size of a step's activations comes from the heap and stays
    mapped once freed, so the next step reuses it instead of mapping (and page-faulting) it afresh;
    with glibc's defaults the same block is a fresh mmap that is unmapped again when freed.
    (Checked through glibc's own accounting, mallinfo2: a page-fault count depends on the machine.)"""
    def heap(mode: str) -> tuple[int, int, int]:
        out = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True,
                             check=True, env=_env(), cwd=REPO)
        return tuple(int(v) for v in out.stdout.split())

    block = 16 << 20
    mmapped, heap_held, heap_freed = heap("init")
    assert mmapped < block and heap_held >= block and heap_freed >= block  # from the heap, and kept
    mmapped_plain, _, _ = heap("plain")
    assert mmapped_plain >= block  # the premise: by default such a block is mmapped (and unmapped on free)


@pytest.mark.slow
def test_gpu_check_on_a_cpu_reports_every_part(tmp_path):
    """`python -m bench.gpu_check --cpu`: one JSON line per part, each passed or skipped with its
    reason, the CUDA-only parts skipped, and the loss curve falling. (The timeouts are stretched: on a
    shared machine a part may take several times its budget; nothing here is timed.)"""
    from bench.gpu_check import PLAN

    out = run_train(["--cpu", "--out", str(tmp_path), "--timeout-factor", "8"], module="bench.gpu_check",
                    timeout=3600).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["part"] for r in lines] == list(PLAN)
    for r in lines:
        assert r.get("ok") is True or (isinstance(r.get("skipped"), str) and r["skipped"]), r
    by_part = {r["part"]: r for r in lines}
    assert by_part["cuda_tests"]["skipped"] == by_part["memory"]["skipped"] == "needs CUDA"
    curve = by_part["loss_curve"]
    assert curve["ok"] and curve["loss_last20"] < 0.8 * curve["loss_first20"]
    assert by_part["fsdp"]["sharded"] and by_part["flight_recorder"]["entries"] > 0
    assert by_part["doc_mask"]["attention"] == "sdpa-mask"
    assert (tmp_path / "flight_recorder_rank0.pkl").exists()


def test_gpt2_track_reaches_its_target_over_two_seeds(tiny_data, tmp_path):
    """The time-to-target track end to end at tiny scale: two seeds of the debug preset on a prepared
    byte dataset, each trained until its validation loss reaches 3.0 nats (it starts at ln 256 = 5.5)."""
    out = run_train(["--preset", "debug", f"--data.path={tiny_data}", "--target", "3.0", "--seeds", "0", "1",
                     "--max-steps", "150", "--eval-every", "25", "--warmup", "5", "--train.threads=1",
                     "--out", str(tmp_path)], module="bench.gpt2_track").stdout
    report = json.loads((tmp_path / "track.json").read_text())
    runs, summary = report["runs"], report["summary"]
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        assert r["reached"] and r["val_loss"] <= 3.0 and r["steps"] % 25 == 0 and r["steps"] <= 150
        assert r["time_to_target_s"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak for a CPU
        assert r["tokens"] == r["steps"] * 8 * 32  # the debug preset's global batch x context
    assert summary["reached"] == 2 and summary["time_to_target_s"]["n"] == 2
    assert summary["time_to_target_s"]["std"] >= 0 and summary["steps_to_target"]["mean"] > 0
    assert "reached by 2 of 2 seeds" in out and "mean ± std over seeds" in out
    # seeds differ: their runs are not copies of one another
    assert runs[0]["val_loss"] != runs[1]["val_loss"]


def test_checkpoint_bench_prints_blocking_total_and_load(tmp_path):
    """bench.checkpoint_bench at the debug preset's size: one async job (sync differs by one option only)."""
    out = run_train(["--configs", "tiny:1:ddp", "--modes", "async", "--saves", "2", "--loads", "1",
                     "--rounds", "1", "--dir", str(tmp_path)], module="bench.checkpoint_bench").stdout
    header = next(line for line in out.splitlines() if line.startswith("config"))
    assert header.split() == ["config", "mode", "block1st", "blockmed", "blockmin", "blockcpu", "n", "total", "load", "peak", "GiB"]
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("tiny:1:ddp")}
    first, steady, fastest, cpu, n, total, load, peak = (float(v) for v in rows["async"][2:])
    assert set(rows) == {"async"} and n == 1 and total >= fastest
    assert min(first, steady, fastest, cpu, total, load, peak) > 0
    assert list(tmp_path.iterdir()) == []  # every job's scratch checkpoints are gone


def test_fsdp_breakdown_counts_each_microsecond_once(tmp_path):
    """bench.fsdp_breakdown on a hand-made two-step trace: a copy inside an all-gather inside forward
    counts as copy, the all-gather's own time as waiting, the rest of forward as compute; gloo's
    worker thread is summed apart."""
    events = [  # main thread 1, gloo thread 2; microseconds
        {"ph": "X", "tid": 1, "name": "forward", "ts": 0, "dur": 1000000},
        {"ph": "X", "tid": 1, "name": "FSDP::all_gather (blocks.0)", "ts": 100000, "dur": 300000},
        {"ph": "X", "tid": 1, "name": "fsdp::all_gather_copy_in", "ts": 120000, "dur": 50000},
        {"ph": "X", "tid": 1, "name": "aten::mm", "ts": 500000, "dur": 200000},
        {"ph": "X", "tid": 1, "name": "optimizer", "ts": 1000000, "dur": 400000},
        {"ph": "X", "tid": 2, "name": "gloo:all_gather", "ts": 130000, "dur": 240000},
    ]
    folder = tmp_path / "run" / "profile" / "steps3-5"
    folder.mkdir(parents=True)
    (folder / "rank0.pt.trace.json").write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run([sys.executable, "-m", "bench.fsdp_breakdown", str(folder)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    rows = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1]) for line in out.splitlines()[1:]}
    # per step (2 profiled steps), in ms
    assert rows["all-gather copy-in"] == 25.0 and rows["all-gather (issue + wait)"] == 125.0
    assert rows["forward compute"] == 350.0 and rows["optimizer"] == 200.0 and rows["total"] == 700.0
    assert rows["gloo threads (beside main)"] == 120.0
