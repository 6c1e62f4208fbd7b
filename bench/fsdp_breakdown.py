"""Where a step's time goes, read from `--train.profile` traces: FSDP's all-gathers and reduce-scatters against compute.

    torchrun --standalone --nproc_per_node=2 -m dist_gpt.train --parallel.data=fsdp --train.steps=6 \\
        --train.profile=3:5 --train.run_dir=runs/fsdp2 ...           # the ~110M shape: see docs/SCALING.md
    python -m bench.fsdp_breakdown runs/fsdp2/profile/steps3-5 runs/ddp2/profile/steps3-5

Each argument is a folder of `rank<r>.pt.trace.json` files (Chrome traces of `dist_gpt.training.profiler`).
For each trace the main thread's time is split without double counting: every microsecond goes to the
innermost event around it that names a kind below (so a copy inside an all-gather counts as copy, the
rest of the all-gather as waiting for it), and what no kind names goes to the trainer's phase around it
(data, forward, backward, agree, optimizer). Times are per profiled step, in ms, averaged over the
ranks. The last line sums the gloo collectives on gloo's own worker threads, which run beside the main
thread (on a CPU they compete with it for the same cores).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

# (kind, pattern on the event name); the innermost matching event decides, so order does not matter
KINDS = [
    ("all-gather copy-in", r"^fsdp::all_gather_copy_in$"),
    ("all-gather copy-out", r"^(FSDP::all_gather_copy_out|fsdp::split_with_sizes_copy)$"),
    ("all-gather (issue + wait)", r"^(FSDP::all_gather|FSDP::unshard)( \(.*\))?$"),
    ("reduce-scatter copy-in", r"^fsdp::chunk_cat$"),
    ("reduce-scatter (issue + wait)", r"^c10d::_reduce_scatter_base_$"),
    ("reduce-scatter, rest (grad copy, wait)", r"^FSDP::post_backward_reduce( \(.*\))?$|^FSDP::root_post_backward_callback$"),
    ("all-reduce (issue)", r"^c10d::allreduce_$"),
    ("data", r"^data$"),
    ("forward compute", r"^forward$"),
    ("backward compute", r"^backward$"),
    ("agree", r"^agree$"),
    ("optimizer", r"^optimizer$"),
]
_COMPILED = [(kind, re.compile(p)) for kind, p in KINDS]


def _kind(name: str) -> str | None:
    for kind, pattern in _COMPILED:
        if pattern.match(name):
            return kind
    return None


def _main_thread(events: list[dict]) -> list[dict]:
    """The thread that ran the trainer's phases (the one with a `forward` event)."""
    tid = next(e["tid"] for e in events if e["name"] == "forward")
    return sorted((e for e in events if e["tid"] == tid), key=lambda e: (e["ts"], -e["dur"]))


def attribute(events: list[dict]) -> dict[str, float]:
    """Exclusive microseconds of the main thread per kind (innermost named ancestor wins)."""
    out: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # [end, kind or None, exclusive us]

    def pop():
        end, kind, excl = stack.pop()
        if kind is not None:
            out[kind] += excl

    for e in _main_thread(events):
        while stack and stack[-1][0] <= e["ts"]:
            pop()
        if stack:
            stack[-1][2] -= e["dur"]  # the child's time is not its parent's own
        own = _kind(e["name"])
        inherited = next((s[1] for s in reversed(stack) if s[1] is not None), None)
        stack.append([e["ts"] + e["dur"], own or inherited, float(e["dur"])])
    while stack:
        pop()
    return out


def read(folder: Path) -> tuple[dict[str, float], float, int]:
    """Per-step ms by kind, gloo worker-thread ms per step, and the profiled steps, averaged over ranks."""
    start, stop = (int(x) for x in re.findall(r"\d+", folder.name)[-2:]) if "steps" in folder.name else (0, 1)
    steps = max(stop - start, 1)
    files = sorted(folder.glob("rank*.pt.trace.json"))
    if not files:
        raise SystemExit(f"fsdp_breakdown: no rank*.pt.trace.json in {folder}; pass a <run_dir>/profile/steps*-* folder")
    total: dict[str, float] = defaultdict(float)
    gloo = 0.0
    for f in files:
        events = [e for e in json.loads(f.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
        for kind, us in attribute(events).items():
            total[kind] += us / 1e3 / steps / len(files)
        gloo += sum(e["dur"] for e in events if e["name"].startswith("gloo:")) / 1e3 / steps / len(files)
    return total, gloo, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="<run_dir>/profile/steps<START>-<STOP> folders")
    args = p.parse_args()
    columns = [(f, *read(f)) for f in args.folders]
    names = [f"{f.parents[1].name}" for f in args.folders]
    print(f"{'ms per step (main thread)':40s}" + "".join(f"{n:>14s}" for n in names))
    for kind, _ in KINDS:
        if any(c[1].get(kind, 0.0) for c in columns):
            print(f"{kind:40s}" + "".join(f"{c[1].get(kind, 0.0):14.1f}" for c in columns))
    print(f"{'total':40s}" + "".join(f"{sum(c[1].values()):14.1f}" for c in columns))
    print(f"{'gloo threads (beside main)':40s}" + "".join(f"{c[2]:14.1f}" for c in columns))


if __name__ == "__main__":
    main()
