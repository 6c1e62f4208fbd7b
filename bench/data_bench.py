"""Data layer benchmark: prepare throughput per tokenizer, and sampler throughput.

    python -m bench.data_bench                    # everything (about a minute on 2 cores)
    python -m bench.data_bench --skip-prepare     # the sampler only
    python -m bench.data_bench --skip-prepare --mixture   # and a 3-source data.mix against one source
    python -m bench.data_bench --bpe 8192 --workdir /tmp/data_bench

Prepare: MB/s of `prepare` (encode phase, the default worker count) for each tokenizer on the
stdlib corpus, next to the tokenizer library alone on the same texts in one process (HF
`encode_batch` and `encode_batch_fast`, which use every core; tiktoken's `encode_ordinary_batch`;
for byte, reading the files). Sampler: tokens/s on one core for 12 x 1024-token batches from a 100M-token uint16
dataset, next to a nanoGPT-style `get_batch` (np.memmap + torch.randint + torch.stack) on the
same file. Streams: MB/s of text that prepare's own process reads out of the stdlib corpus as one
.jsonl.gz, one .jsonl.zst and one .parquet file (one document per source file; decompressing and
cutting work units, which is all it does for such a file before the workers encode). Record
results in docs/PERFORMANCE.md ("Data").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_gpt.data.sources import stdlib_inputs
from dist_gpt.errors import DataError

B, T = 12, 1024


def _best(fn, repeats: int) -> float:
    """Fastest of a few runs (seconds): the machine is shared, the minimum is the least disturbed."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_prepare(workdir: Path, bpe: int, repeats: int) -> list[dict]:
    from dist_gpt.data.prepare import PrepareOptions, prepare

    files = stdlib_inputs()
    nbytes = sum(f.size for f in files)
    texts = [Path(f.path).read_text(encoding="utf-8") for f in files]
    rows = []
    for tok in ("byte", "char", f"bpe:{bpe}", "gpt2"):
        out = workdir / tok.replace(":", "_")
        speeds = []
        try:
            for _ in range(repeats):
                shutil.rmtree(out, ignore_errors=True)
                prepare(PrepareOptions(out=str(out), source="stdlib", tokenizer=tok, progress=False, verify=False))
                speeds.append(json.loads((out / "manifest.json").read_text())["encode_mb_per_s"])
        except DataError as e:  # gpt2 offline: report, keep going
            rows.append({"tokenizer": tok, "error": str(e).split(";")[0]})
            continue
        row = {"tokenizer": tok, "prepare_mb_s": max(speeds)}
        if tok == "byte":
            row["library"] = "read files"
            row["library_mb_s"] = nbytes / 1e6 / _best(lambda: [Path(f.path).read_bytes() for f in files], repeats)
        elif tok.startswith("bpe"):
            from tokenizers import Tokenizer
            lib = Tokenizer.from_file(str(out / "tokenizer.json"))
            row["library"] = "HF encode_batch"
            row["library_mb_s"] = nbytes / 1e6 / _best(lambda: lib.encode_batch(texts, add_special_tokens=False), repeats)
            row["library_fast_mb_s"] = nbytes / 1e6 / _best(lambda: lib.encode_batch_fast(texts, add_special_tokens=False), repeats)
        elif tok == "gpt2":
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")
            row["library"] = "tiktoken encode_ordinary_batch"
            row["library_mb_s"] = nbytes / 1e6 / _best(lambda: enc.encode_ordinary_batch(texts), repeats)
        if "library_mb_s" in row:
            row["ratio"] = row["prepare_mb_s"] / row["library_mb_s"]
        rows.append(row)
    return rows


def bench_streams(workdir: Path, repeats: int) -> list[dict]:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from dist_gpt.data.sources import CHUNK_BYTES, _input
    from dist_gpt.data.streams import stream_units

    texts = [Path(f.path).read_text(encoding="utf-8") for f in stdlib_inputs()]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (workdir / "stdlib.jsonl.gz").write_bytes(gzip.compress(body, compresslevel=6))
    (workdir / "stdlib.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(body))
    pq.write_table(pa.table({"text": texts}), workdir / "stdlib.parquet", compression="zstd")
    text_mb = sum(len(t.encode()) for t in texts) / 1e6
    rows = []
    for name in ("stdlib.jsonl.gz", "stdlib.jsonl.zst", "stdlib.parquet"):
        f = _input(workdir / name)
        seconds = _best(lambda: sum(1 for _ in stream_units(f, 0, 0, CHUNK_BYTES, "text")), repeats)
        rows.append({"file": name, "mb_on_disk": f.size / 1e6, "text_mb_s": text_mb / seconds})
    return rows


def _sampler_dataset(workdir: Path) -> Path:
    from dist_gpt.data.tokenizers import _sha256_json
    from dist_gpt.data.writer import DatasetWriter

    class Vocab50257:  # gpt2's spec and ids (random ones: no tokenizer is needed to measure reading)
        name, vocab_size, eot_id, spec = "bench", 50257, None, {"kind": "tiktoken", "encoding": "gpt2"}
        fingerprint = _sha256_json(spec)  # a kind Dataset.open knows, so the file opens

    out = workdir / "sampler_100m"
    if not (out / "manifest.json").exists():
        writer = DatasetWriter(out, Vocab50257(), shard_tokens=100_000_000)
        rng = np.random.default_rng(0)
        for _ in range(10):
            writer.write("train", rng.integers(0, 50257, 10_000_000, dtype=np.uint16))
        writer.write("val", rng.integers(0, 50257, 100_000, dtype=np.uint16))
        writer.finish({"kind": "bench"})
    return out


def bench_sampler(workdir: Path, batches: int, repeats: int) -> dict:
    import torch
    from dist_gpt.data import Dataset, TrainBatches

    torch.set_num_threads(1)
    ds = Dataset.open(_sampler_dataset(workdir))
    loader = TrainBatches(ds, block_size=T, global_batch=B, micro_batch=B, seed=0, prefetch=False)
    loader.next()
    ours = _best(lambda: [loader.next() for _ in range(batches)], repeats)

    shard = ds.shards["train"][0].path

    def get_batch():  # nanoGPT's, on the same file (its header skipped)
        data = np.memmap(shard, dtype=np.uint16, mode="r", offset=256)
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy((data[i:i + T]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + T]).astype(np.int64)) for i in ix])
        return x, y

    get_batch()
    theirs = _best(lambda: [get_batch() for _ in range(batches)], repeats)
    tokens = batches * B * T
    return {"sampler_mtok_s": tokens / ours / 1e6, "nanogpt_get_batch_mtok_s": tokens / theirs / 1e6,
            "us_per_batch": ours / batches * 1e6}


def _small_source(workdir: Path, name: str, tokens: int, seed: int) -> Path:
    """Another dataset of the same (bench) tokenizer as _sampler_dataset: a mixture's further sources."""
    from dist_gpt.data.tokenizers import _sha256_json
    from dist_gpt.data.writer import DatasetWriter

    class Vocab50257:
        name, vocab_size, eot_id, spec = "bench", 50257, None, {"kind": "tiktoken", "encoding": "gpt2"}
        fingerprint = _sha256_json(spec)

    out = workdir / name
    if not (out / "manifest.json").exists():
        writer = DatasetWriter(out, Vocab50257(), shard_tokens=tokens)
        rng = np.random.default_rng(seed)
        writer.write("train", rng.integers(0, 50257, tokens, dtype=np.uint16))
        writer.write("val", rng.integers(0, 50257, 100_000, dtype=np.uint16))
        writer.finish({"kind": "bench"})
    return out


def bench_mixture(workdir: Path, batches: int, repeats: int) -> dict:
    """Tokens/s of a 3-source mixture (0.5/0.3/0.2: the 100M-token dataset and two of 10M) against the
    single-source sampler on the first, timed alternately in one process, one core."""
    import torch
    from dist_gpt.data import DataConfig, Dataset, TrainBatches
    from dist_gpt.data.mixloader import MixtureBatches, open_mixture

    torch.set_num_threads(1)
    first = _sampler_dataset(workdir)
    mix = open_mixture(DataConfig(mix=f"a:{first}:0.5,b:{_small_source(workdir, 'mix_b', 10_000_000, 1)}:0.3,"
                                      f"c:{_small_source(workdir, 'mix_c', 10_000_000, 2)}:0.2"))
    single = TrainBatches(Dataset.open(first), block_size=T, global_batch=B, micro_batch=B, seed=0, prefetch=False)
    mixed = MixtureBatches(mix, block_size=T, global_batch=B, micro_batch=B, seed=0, prefetch=False)
    single.next(), mixed.next()
    one, three = [], []
    for _ in range(repeats):  # alternating, so that load from other users falls on both alike
        one.append(_best(lambda: [single.next() for _ in range(batches)], 1))
        three.append(_best(lambda: [mixed.next() for _ in range(batches)], 1))
    tokens = batches * B * T
    return {"single_mtok_s": tokens / min(one) / 1e6, "mixture_mtok_s": tokens / min(three) / 1e6,
            "ratio": min(one) / min(three)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where datasets are built (default: a temporary directory, removed after)")
    p.add_argument("--bpe", type=int, default=8192, help="vocabulary of the bpe:N tokenizer (default 8192)")
    p.add_argument("--batches", type=int, default=2000, help="sampler batches per timing (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="timings per number; the best is reported (default 3)")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--mixture", action="store_true", help="also time a 3-source data.mix sampler against the "
                                                         "single-source one (the 80%% target of docs/PERFORMANCE.md)")
    args = p.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="data_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = {"cores": len(os.sched_getaffinity(0))}
        result["sampler"] = bench_sampler(workdir, args.batches, args.repeats)
        if args.mixture:
            result["mixture"] = bench_mixture(workdir, args.batches, args.repeats)
        if not args.skip_prepare:
            result["streams"] = bench_streams(workdir, args.repeats)
            result["prepare"] = bench_prepare(workdir, args.bpe, args.repeats)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["sampler"]
    print(f"sampler ({B} x {T} tokens, uint16, 100M-token dataset, 1 core): {s['sampler_mtok_s']:.1f}M tokens/s "
          f"({s['us_per_batch']:.0f} us/batch); nanoGPT get_batch: {s['nanogpt_get_batch_mtok_s']:.1f}M tokens/s")
    if "mixture" in result:
        m = result["mixture"]
        print(f"mixture of 3 sources (0.5/0.3/0.2): {m['mixture_mtok_s']:.1f}M tokens/s against {m['single_mtok_s']:.1f}M "
              f"for one source, alternately timed: {100 * m['ratio']:.0f}%")
    for row in result.get("streams", []):
        print(f"read {row['file']:<17} ({row['mb_on_disk']:.1f} MB on disk): {row['text_mb_s']:7.1f} MB/s of text")
    for row in result.get("prepare", []):
        if "error" in row:
            print(f"prepare {row['tokenizer']:<10} unavailable: {row['error']}")
            continue
        lib = f"; {row['library']}: {row['library_mb_s']:.1f} MB/s (ratio {row['ratio']:.2f})" if "library" in row else ""
        if "library_fast_mb_s" in row:
            lib += f"; encode_batch_fast (no offsets): {row['library_fast_mb_s']:.1f} MB/s"
        print(f"prepare {row['tokenizer']:<10} {row['prepare_mb_s']:7.1f} MB/s{lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
