"""When `train.compile=auto` compiles: a pure rule from the run's length and shape, with its numbers.

    case = CompileCase(device="cpu", steps=800, n_layer=4, micro_steps=1, width_work=..., threads=1)
    choice = decide(None, case)     # train.compile=auto, a fresh run
    choice.on, choice.reason        # False, "auto -> off (800 steps x ~39 ms saved <= 2 x ~44 s compile)"

An explicit true/false always wins. A resumed run keeps the choice its checkpoint recorded
(`recorded`), so training longer never switches compile mid-run; a checkpoint written before the
choice was recorded resumes as auto decided then (on for CUDA, off on CPU).

On CUDA auto compiles (the fast path every GPU preset is written for). On CPU compiling pays only
when the time it saves per step, over the run's steps, repays the time it takes, the C++ build of
inductor's kernels included. Both were measured with `python -m bench.compile_bench` (CPU time of
eager against compiled steps, alternating, and of the compile; docs/PERFORMANCE.md, "When auto
compiles on CPU"), and the rule is the simplest that fits them:

    compile_s  ~ COMPILE_S + COMPILE_S_PER_LAYER x n_layer              (a cold inductor cache)
    saved_ms   ~ SAVED_MS_PER_LAYER_PASS x n_layer x micro_steps         (every model)
               + SAVED_NS_PER_WIDTH_WORK x width_work / threads / 1e6    (composite models only)
    on when      steps x saved_ms / 1000 > MARGIN x compile_s

The saving has two parts. A block's forward and backward run dozens of small operators, and a
compiled block a few fused kernels instead: a fixed time per block per micro-batch (`micro_steps`:
this rank's micro-batches per step), which dominates tiny models. And a share of the step's
work proper: `width_work` = tokens per rank per step x n_layer x n_embd², the shape of the matmul
FLOPs (a quarter of the modern step at 128 and at 256 wide, at 4 and 8 blocks; a term linear in
n_embd, as elementwise work alone would be, was off by 2x at 256 wide). That second part is large
only where the norms, positions or MLP run eagerly as several operators each (RMSNorm, rotary
positions, QK-norm, ReLU²: "composite", the modern recipe, which compile made 24% faster); the
classic recipe's LayerNorm and GELU are single operators already, and its measured saving (4%) is
the first part alone. Dividing the second part by the threads is an assumption (measured at one
thread), on the side of compiling less. MARGIN covers what the estimate leaves out (a busy machine,
a run stopped early, a warm cache making compiles cheaper is not counted on).

Auto also stays eager wherever compiling cannot work (`refusal`): torch without dynamo support for
this Python, a CPU without the C++ compiler inductor builds its kernels with, or CUDA without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Measured with bench/compile_bench.py on the 2-core AMD EPYC (torch 2.13.0+cpu, bf16 autocast, one
# thread, CPU seconds, a cold inductor cache): docs/PERFORMANCE.md "When auto compiles on CPU".
COMPILE_S = 36.0                 # seconds of compile at any depth (dynamo, AOT autograd, inductor, g++ start-up)
COMPILE_S_PER_LAYER = 2.0        # seconds per transformer block (4 blocks: 44 s, 8 blocks: 52 s)
SAVED_MS_PER_LAYER_PASS = 1.4    # ms saved per block per micro-batch, forward + backward (operator overhead)
SAVED_NS_PER_WIDTH_WORK = 0.25   # ns saved per token x layer x n_embd² per step at one thread (composite models)
MARGIN = 2.0                     # compile only when the saving is at least twice the compile time

HELP = ("torch.compile the model: true | false | auto (unset: on for CUDA; on CPU only when the run is long "
        f"enough to repay compiling: steps x saved > {MARGIN:g} x compile, with saved ~{SAVED_MS_PER_LAYER_PASS:g} ms "
        f"x n_layer x micro-batches per rank per step + {SAVED_NS_PER_WIDTH_WORK:g} ns x tokens per rank per step x "
        "n_layer x n_embd² / threads for models with RMSNorm, rotary, QK-norm or ReLU², and compile ~"
        f"{COMPILE_S:g} + {COMPILE_S_PER_LAYER:g} x n_layer s (a cold inductor cache), as measured on a 2-core "
        "AMD EPYC, see docs/PERFORMANCE.md; a resumed run keeps the choice its checkpoint recorded; off where "
        "compiling cannot work: no dynamo for this Python, no C++ compiler on CPU, no Triton on CUDA). "
        "The start-up log says what auto decided and why")


@dataclass(frozen=True)
class CompileCase:
    """What the rule looks at: the device, the run's length and its per-rank shape."""

    device: str            # "cpu" | "cuda"
    steps: int             # optimizer steps the run will take
    n_layer: int
    micro_steps: int       # this rank's micro-batches per optimizer step (gradient accumulation)
    width_work: float      # tokens per rank per step x n_layer x n_embd²
    composite: bool = True  # RMSNorm, rotary, QK-norm or ReLU² (several eager operators each): both parts saved
    threads: int = 1       # CPU threads per rank
    refused: str | None = None  # why compiling cannot work here (`refusal`), or None


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    reason: str            # one line for the start-up log: "auto -> on (...)", "true (set)", ...


def compile_seconds(n_layer: int) -> float:
    """Estimated cold compile time on CPU (seconds)."""
    return COMPILE_S + COMPILE_S_PER_LAYER * n_layer


def saved_ms_per_step(case: CompileCase) -> float:
    """Estimated time compile saves per step on CPU (milliseconds)."""
    overhead = SAVED_MS_PER_LAYER_PASS * case.n_layer * case.micro_steps
    if not case.composite:
        return overhead
    return overhead + SAVED_NS_PER_WIDTH_WORK * case.width_work / max(1, case.threads) / 1e6


def decide(setting: bool | None, case: CompileCase, recorded: bool | None = None,
           resumed: bool = False) -> CompileChoice:
    """train.compile (None = auto) for `case`. `resumed`: a checkpoint is being resumed, whose
    recorded choice is `recorded` (None: written before choices were recorded)."""
    if setting is not None:
        return CompileChoice(setting, f"{'true' if setting else 'false'} (set)")
    if case.refused:
        return CompileChoice(False, f"auto -> off ({case.refused})")
    if resumed:
        if recorded is None:  # auto as it was decided before this rule: on for CUDA, off elsewhere
            on = case.device == "cuda"
            return CompileChoice(on, f"auto -> {'on' if on else 'off'} (resumed from a checkpoint without a "
                                     f"record: as auto decided then, {'on for CUDA' if on else 'off on CPU'})")
        return CompileChoice(recorded, f"auto -> {'on' if recorded else 'off'} (as the resumed run recorded)")
    if case.device != "cpu":
        return CompileChoice(case.device == "cuda", f"auto -> {'on' if case.device == 'cuda' else 'off'} "
                                                    f"({case.device})")
    saved, cost = saved_ms_per_step(case), compile_seconds(case.n_layer)
    on = case.steps * saved / 1000 > MARGIN * cost
    shown = f"{saved:,.0f}" if saved >= 10 else f"{saved:.2g}"
    return CompileChoice(on, f"auto -> {'on' if on else 'off'} ({case.steps} steps x ~{shown} ms saved "
                             f"{'>' if on else '<='} {MARGIN:g} x ~{cost:.0f} s compile)")


def refusal(device_type: str) -> str | None:
    """Why torch.compile cannot work in this process on `device_type`, or None where it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} has no torch.compile for this Python"
    if device_type == "cuda":
        from torch.utils._triton import has_triton  # optional: only asked on CUDA

        return None if has_triton() else "no Triton for inductor's GPU kernels: pip install triton"
    if device_type != "cpu":
        return None
    try:  # optional: inductor's own compiler search (g++, or $CXX), only asked on CPU
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except ImportError:
        return None  # another torch layout: let compile itself say what is missing
    except Exception as e:  # torch._inductor.exc.InvalidCxxCompiler: no working g++ / $CXX
        return f"no C++ compiler for inductor's CPU kernels ({type(e).__name__}): install g++ or set CXX"
    return None
