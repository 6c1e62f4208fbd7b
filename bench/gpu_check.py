"""The first thing to run on a GPU: every check that needs one, in one command, one JSON line per part.

    python -m bench.gpu_check                    # one GPU, at most ~5 minutes on an H100
    python -m bench.gpu_check --cpu              # no GPU: every part that does not need CUDA, tiny sizes
    python -m bench.gpu_check --parts fsdp,loss_curve --out runs/gpu_check

Run it from the repository root. Each part runs in a process of its own with its own timeout and
prints one JSON line the moment it ends (flushed), so a run cut off by a short GPU lease still
reports every part it finished:

    {"part": "throughput_bf16", "ok": true, "seconds": 61.2, "tokens_per_s": ..., "mfu": ..., ...}
    {"part": "memory", "skipped": "needs CUDA"}
    {"part": "doc_mask", "ok": false, "seconds": 75.0, "error": "timed out after 75 s", "log": "..."}

The parts (bench/gpu_parts.py has what each measures and when it passes):

    cuda_tests        the test suite's CUDA-only tests (`pytest -m cuda`)
    throughput_bf16   gpt2-124m, bf16 + torch.compile, synthetic tokens: tokens/s and MFU
    throughput_fp8    the same with `--train.fp8=true` (torchao float8, tensorwise)
    fsdp              FSDP2 on one device against the same run unsharded
    doc_mask          `model.doc_mask` (FlexAttention on a GPU) against plain causal attention
    memory            peak CUDA memory of gpt2-124m's steps against `--dry-run`'s estimate
    flight_recorder   the collective flight recorder's dump after real steps in a process group
    loss_curve        200 steps of a 6 x 6 x 384 model on synthetic data: the loss must fall

A part whose package is missing (pytest, torchao) is reported as `"skipped": "<package> not
installed"`; with `--cpu` the parts that need CUDA are skipped with the reason, the others run at
the debug preset's size (FP8 through torchao's emulation). The exit status is 0 when no part failed.
Logs of every part, the synthetic dataset and the flight-recorder dump stay in `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# part -> (needs CUDA, timeout on a GPU, timeout on a CPU); the GPU budgets add up to ~5 minutes of
# typical runs (compilation of gpt2-124m dominates the throughput parts).
PLAN = {
    "cuda_tests": (True, 120, 0),
    "throughput_bf16": (False, 100, 90),
    "throughput_fp8": (False, 110, 100),
    "fsdp": (False, 60, 60),
    "doc_mask": (False, 90, 60),
    "memory": (True, 60, 0),
    "flight_recorder": (False, 45, 45),
    "loss_curve": (False, 60, 60),
}
FLIGHT_RECORDER_ENTRIES = "2000"


def missing_dependency(part: str, cpu: bool) -> str | None:
    """Why `part` cannot run here for want of a package, an option or FP8 hardware, else None."""
    if part == "cuda_tests" and importlib.util.find_spec("pytest") is None:
        return "pytest not installed"
    if part == "throughput_fp8":
        from dist_gpt.config import TrainConfig

        if "fp8" not in {f.name for f in dataclasses.fields(TrainConfig)}:
            return "train.fp8 is not an option of this dist_gpt"
        if importlib.util.find_spec("torchao") is None:
            return "torchao not installed"
        import torch

        if not cpu and torch.cuda.get_device_capability() < (8, 9):
            return f"needs FP8 matmuls (compute capability 8.9+), {torch.cuda.get_device_name()} has none"
    return None


def part_env(part: str, cpu: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    if part == "flight_recorder":  # read when the process group starts
        env["TORCH_FR_BUFFER_SIZE"] = env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = FLIGHT_RECORDER_ENTRIES
    if part == "throughput_fp8" and cpu:
        env["DIST_GPT_FP8_EMULATE"] = "1"  # torchao's emulated float8: the CPU has no FP8 matmuls
    return env


def run_part(part: str, args, data: Path) -> dict:
    """One part in a child process (`--part`); its result, or why it failed, as a dict."""
    needs_cuda, gpu_s, cpu_s = PLAN[part]
    if needs_cuda and args.cpu:
        return {"skipped": "needs CUDA"}
    why = missing_dependency(part, args.cpu)
    if why:
        return {"skipped": why}
    timeout = round((cpu_s if args.cpu else gpu_s) * args.timeout_factor)
    log = args.out / f"{part}.log"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--part", part, "--data", str(data), "--out", str(args.out)]
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            proc = subprocess.run([*cmd, *(["--cpu"] if args.cpu else [])], cwd=REPO, env=part_env(part, args.cpu),
                                  stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            f.write(e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            return {"ok": False, "seconds": round(time.monotonic() - t0, 1),
                    "error": f"timed out after {timeout} s", "log": str(log)}
        f.write(proc.stdout)
    seconds = round(time.monotonic() - t0, 1)
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        return {"ok": False, "seconds": seconds, "error": (lines[-1] if lines else f"exit {proc.returncode}")[:400],
                "log": str(log)}
    return {**json.loads(results[-1]), "seconds": seconds}


def child(args) -> None:
    """`--part NAME`: run that part here and print `RESULT <json>`."""
    from bench.gpu_parts import PARTS, PartOptions

    result = PARTS[args.part](PartOptions(cpu=args.cpu, data=args.data, out=args.out))
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # a process group of one (nccl/gloo) need not be torn down for a result already printed


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="no GPU: run the parts that do not need CUDA, at tiny sizes")
    p.add_argument("--parts", default=",".join(PLAN), help=f"comma-separated subset of: {', '.join(PLAN)}")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"),
                   help="folder for the parts' logs, run directories, dataset and dumps (default runs/gpu_check)")
    p.add_argument("--timeout-factor", type=float, default=1.0,
                   help="multiply every part's timeout (a machine shared with other jobs needs more)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [x for x in args.parts.split(",") if x not in PLAN]
    if unknown:
        p.error(f"--parts: unknown part {unknown[0]!r}; the parts are {', '.join(PLAN)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        child(args)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device here: on a machine without a GPU run `python -m bench.gpu_check --cpu`",
              file=sys.stderr)
        return 2
    from bench.synthetic_data import synthetic_dataset

    data = synthetic_dataset(args.out / ("data_cpu" if args.cpu else "data"), 400_000 if args.cpu else 8_000_000)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    failed = 0
    for part in args.parts.split(","):
        result = {"part": part, "device": device, **run_part(part, args, data)}
        failed += result.get("ok") is False
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
