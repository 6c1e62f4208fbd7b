"""The fingerprint of the machine a number was recorded on, for tests that hold a recorded number.

A recorded fp32 loss repeats bit for bit only where the same kernels run in the same order: the same torch
build, the same CPU (vendor, model name, family and model number: two CPUs that both report AVX512 to torch,
an AMD EPYC and an Intel Xeon, differ in the 7th digit), the same ISA level torch dispatches to, and the same
thread count (the matmul kernels split work by threads). Anywhere else a recorded number holds only within a
documented tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """vendor_id, model name, cpu family and model of the first processor ("unknown" where not told)."""
    fields = {"vendor_id": "cpu_vendor", "model name": "cpu_model_name", "cpu family": "cpu_family",
              "model": "cpu_model"}
    out = dict.fromkeys(fields.values(), "unknown")
    try:
        first = cpuinfo.read_text().split("\n\n")[0]
    except OSError:
        return out
    for line in first.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in fields:
            out[fields[key.strip()]] = value.strip()
    return out


def fingerprint(threads: int) -> dict[str, str | int]:
    """What fixes a CPU run's kernels: torch, the CPU, the ISA level torch uses, and the thread count."""
    return {"torch": torch.__version__, **cpu_identity(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads}
