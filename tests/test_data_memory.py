"""Bounded memory: preparing and then sampling a corpus larger than a generous page-cache-free
budget keeps the resident memory of the process and of its worker processes flat.

A subprocess records its resident size (and resets its peak with /proc/self/clear_refs),
prepares a >= 2 GB generated corpus with two worker processes and verifies it; then imports torch,
re-records, draws random train blocks from all of it and reads the whole val split. It reports
the growth of its peak (VmHWM) in each phase, and the peak of its children (ru_maxrss) over that
of an idle worker started the same way. An address-space
limit cannot be used: mapping files (and torch's own arenas) reserve far more than they touch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GB = 10**9
LIMIT_MB = 100

SCRIPT = r"""
import json, os, resource, sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from dist_gpt.data.prepare import PrepareOptions, prepare


def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


def worker_baseline():
    # what a prepare worker holds before encoding anything: the interpreter and its imports
    from dist_gpt.data import encode  # noqa: F401
    import tokenizers  # noqa: F401
    return rss_kb("VmRSS")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: from here on VmHWM is the peak of what follows


def children_peak_kb():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main(corpus, out):
    # phase 1, prepare: torch is not imported yet, so the workers' own memory is what ru_maxrss sees
    # (a child's ru_maxrss also counts the parent's pages it had between fork and exec)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child_inside = pool.submit(worker_baseline).result()
    child_base = children_peak_kb()
    base1 = rss_kb("VmRSS")
    reset_peak()
    t = time.time()
    prepare(PrepareOptions(out=out, inputs=[corpus], tokenizer="byte", workers=2, progress=False,
                           shard_tokens=500_000_000))
    prepare_s = time.time() - t
    peak1 = rss_kb("VmHWM")

    # phase 2, sampling: random train blocks over the whole split, then the whole val split
    import torch
    from dist_gpt.data import Dataset, TrainBatches, ValBlocks

    torch.set_num_threads(1)
    ds = Dataset.open(out)
    batches = TrainBatches(ds, block_size=1024, global_batch=16, micro_batch=16, seed=0)
    batches.next()
    base2 = rss_kb("VmRSS")
    reset_peak()
    for _ in range(20_000):  # ~330 MB of random blocks spread over the whole 1.9 GB train split
        (x, y), = batches.next()
    val_tokens = sum(x.numel() for x, _ in ValBlocks(ds, block_size=1024, batch_size=64))
    peak2 = rss_kb("VmHWM")
    print(json.dumps({
        "prepare_growth_mb": (peak1 - base1) / 1024, "sample_growth_mb": (peak2 - base2) / 1024,
        "workers_growth_mb": (children_peak_kb() - child_base) / 1024,
        "worker_rss_at_start_mb": child_inside / 1024, "workers_peak_mb": children_peak_kb() / 1024,
        "train_tokens": ds.num_tokens("train"), "val_tokens_read": val_tokens, "prepare_s": prepare_s,
    }))


if __name__ == "__main__":  # spawned workers import this file: only the parent runs main
    main(sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow
def test_prepare_and_sample_2gb_in_flat_memory(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = __import__("numpy").random.default_rng(0)
    block = rng.integers(97, 123, 1 << 20, dtype="uint8")
    block[::80] = 10  # lines of 80 characters
    with open(corpus, "wb") as f:
        for i in range(2 * GB // (1 << 20) + 1):
            block[0] = 97 + i % 26  # not one repeated megabyte
            f.write(block.tobytes())
    assert corpus.stat().st_size >= 2 * GB
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "measure.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(corpus), str(tmp_path / "ds")], env=env,
                         capture_output=True, text=True, timeout=1200)
    shutil.rmtree(tmp_path)  # 4 GB: do not leave it to pytest's retention of old temp dirs
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    print(r)
    assert r["train_tokens"] + r["val_tokens_read"] > 1.9 * GB
    assert r["prepare_growth_mb"] <= LIMIT_MB, r
    assert r["sample_growth_mb"] <= LIMIT_MB, r
    assert r["workers_growth_mb"] <= LIMIT_MB, r
