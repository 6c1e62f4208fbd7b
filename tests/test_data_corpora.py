"""Pre-training corpora as they ship: parquet, .jsonl.zst, .jsonl.gz and .txt.gz inputs, read in one
streaming pass with bounded memory, and their errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_gpt.data import Dataset
from dist_gpt.data.prepare import main as prepare_main
from dist_gpt.data.shard_tools import decode_slice, verify_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
ALL = "*.parquet,*.jsonl.zst,*.jsonl.gz,*.txt.gz"


def _prepare(*args) -> int:
    return prepare_main([*map(str, args), "--quiet"])


def _docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta\n", "theta,", "  iota"]
    return [" ".join(rng.choice(words, rng.integers(1, 60))) + "\n" for _ in range(n)]


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)).encode()


def mixed_corpus(root: Path) -> tuple[Path, list[str]]:
    """One of each kind, in name order; returns the directory and every document in input order.
    The zstd file has two frames and the gzip file two members; the parquet file several row groups
    and a null row (an empty document)."""
    root.mkdir(parents=True, exist_ok=True)
    a, b, d = _docs(300, 1), _docs(300, 2), _docs(400, 3)
    z = zstandard.ZstdCompressor()
    (root / "a.jsonl.zst").write_bytes(z.compress(_jsonl(a[:120])) + z.compress(_jsonl(a[120:])))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(b[:200])) + gzip.compress(_jsonl(b[200:])))
    c = "a plain text file, gzipped\n" * 3000
    (root / "c.txt.gz").write_bytes(gzip.compress(c.encode()))
    pq.write_table(pa.table({"id": list(range(401)), "text": d[:200] + [None] + d[200:]}), root / "d.parquet",
                   row_group_size=90)
    (root / "e.jsonl").write_bytes(_jsonl(["plain jsonl after them\n"]))
    return root, a + b + [c] + d + ["plain jsonl after them\n"]


def _documents_of(out: Path) -> list[str]:
    ds = Dataset.open(out)
    return [doc for split in ("train", "val")
            for doc in decode_slice(out, split, 0, ds.num_tokens(split)).split(EOT)[1:]]


def test_mixed_compressed_and_parquet_inputs(tmp_path, capsys):
    corpus, docs = mixed_corpus(tmp_path / "corpus")
    prints = []
    for workers in (0, 2):
        out = tmp_path / f"ds{workers}"
        assert _prepare(corpus, "--include", ALL + ",*.jsonl", "--tokenizer", "bpe:300", "--chunk-mb", "0.0625",
                        "--workers", workers, "--out", out) == 0, capsys.readouterr().err
        assert verify_dataset(out) == []
        prints.append(Dataset.open(out).fingerprint)
    assert prints[0] == prints[1]  # the same dataset for any number of workers
    got = _documents_of(out)
    assert sorted(got) == sorted(docs)  # every document once, split between train and val
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(docs)
    assert 0 < m["splits"]["val"]["documents"] < 0.15 * len(docs)  # --val-split 0.05, per document
    assert sum(m["splits"][s]["source_bytes"] for s in ("train", "val")) == sum(len(d.encode()) for d in docs)
    # the same request again: nothing to do
    assert prepare_main([str(corpus), "--include", ALL + ",*.jsonl", "--tokenizer", "bpe:300", "--chunk-mb", "0.0625",
                         "--workers", "2", "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_byte_level_documents_from_the_index(tmp_path):
    corpus, docs = mixed_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    assert _prepare(corpus, "--include", ALL + ",*.jsonl", "--chunk-mb", "0.0625", "--shard-tokens", "20000",
                    "--out", out) == 0
    ds = Dataset.open(out)
    got = []
    for split in ("train", "val"):  # several shards: documents run across their ends
        ends = np.cumsum([s.num_tokens for s in ds.shards[split]]) - [s.num_tokens for s in ds.shards[split]]
        starts = np.concatenate([local + end for local, end in zip(ds.doc_starts(split, "test"), ends)])
        bounds = list(starts) + [ds.num_tokens(split)]
        got += [decode_slice(out, split, int(a), int(b - a)) for a, b in zip(bounds, bounds[1:])]
    assert sorted(got) == sorted(d for d in docs if d)  # the null parquet row has no tokens, no start


def test_byte_tokens_of_compressed_text_are_its_bytes(tmp_path):
    text = "".join(_docs(2000, 5))
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(text.encode()))
    out = tmp_path / "ds"
    assert _prepare(tmp_path / "t.txt.gz", "--chunk-mb", "0.0625", "--val-split", "0.1", "--out", out) == 0
    ds = Dataset.open(out)
    assert decode_slice(out, "train", 0, ds.num_tokens("train")) + decode_slice(out, "val", 0, ds.num_tokens("val")) == text


def test_parquet_row_group_larger_than_the_work_unit_streams(tmp_path):
    """One 30 MB row group (incompressible text) with 64 KB work units: pyarrow's peak allocation
    stays a small fraction of the row group, because rows are read in record batches through a
    read buffer, not as whole row groups or column chunks. (Measured here: ~7 MB whatever the row
    group's size, against 22 MB for a 10 MB row group read whole and 40 MB for this one.)"""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \n", dtype=np.uint8)
    texts = [letters[rng.integers(0, 32, 1000)].tobytes().decode() for _ in range(30_000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=len(texts), compression="zstd")
    group = pq.ParquetFile(path).metadata.row_group(0)
    assert group.num_rows == len(texts) and group.total_byte_size > 30e6
    script = ("import sys, pyarrow as pa; from dist_gpt.data.prepare import PrepareOptions, prepare; "
              "prepare(PrepareOptions(out=sys.argv[2], inputs=[sys.argv[1]], workers=0, chunk_mb=0.0625, progress=False)); "
              "print(pa.default_memory_pool().max_memory())")
    run = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "ds")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    peak = int(run.stdout.split()[-1])
    assert peak < group.total_byte_size / 3, (peak, group.total_byte_size)
    assert Dataset.open(tmp_path / "ds").num_tokens("train") + Dataset.open(tmp_path / "ds").num_tokens("val") == 30_000_000


def _damaged(tmp_path: Path) -> dict[str, Path]:
    body = _jsonl(_docs(3000, 7))
    z, g = zstandard.ZstdCompressor().compress(body), gzip.compress(body)
    files = {"truncated.jsonl.zst": z[: len(z) // 2], "garbage.jsonl.zst": b"not zstd at all" * 10,
             "truncated.jsonl.gz": g[: len(g) // 2], "corrupt.txt.gz": g[:100] + b"x" * 1000 + g[1100:]}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    pq.write_table(pa.table({"text": _docs(3000, 8)}), tmp_path / "whole.parquet")
    raw = (tmp_path / "whole.parquet").read_bytes()
    paths["truncated.parquet"] = tmp_path / "truncated.parquet"
    paths["truncated.parquet"].write_bytes(raw[: len(raw) // 2])
    paths["flipped.parquet"] = tmp_path / "flipped.parquet"
    paths["flipped.parquet"].write_bytes(raw[:200] + bytes(b ^ 0xFF for b in raw[200:4000]) + raw[4000:])
    return paths


def test_corrupt_or_truncated_inputs_are_one_line_errors(tmp_path, capsys):
    for name, path in _damaged(tmp_path).items():
        assert _prepare(path, "--out", tmp_path / "ds", "--tokenizer", "char") == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}: ") and "\n" not in err, err
        assert ("corrupt or truncated" in err or "not valid UTF-8" in err or "not a JSON line" in err), err
        assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.prepare-*"))


def test_parquet_column_and_split_errors(tmp_path, capsys):
    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), tmp_path / "p.parquet")
    assert _prepare(tmp_path / "p.parquet", "--out", tmp_path / "ds") == 2
    assert "no 'text' column (it has body, n); choose the text column with --text-field" in capsys.readouterr().err
    assert _prepare(tmp_path / "p.parquet", "--text-field", "n", "--out", tmp_path / "ds") == 2
    assert "column 'n' holds int64, not strings" in capsys.readouterr().err
    assert _prepare(tmp_path / "p.parquet", "--text-field", "body", "--val-split", "0", "--out", tmp_path / "ds") == 0


def test_val_split_count_on_compressed_jsonl_holds_back_exactly_that_many(tmp_path, capsys):
    """--val-split N (a count of documents) on .jsonl.zst / .jsonl.gz: prepare counts their documents
    in an extra decompression pass and picks exactly N, the same ones as from the plain .jsonl (it was
    refused). The last line lacks its newline, and it still counts."""
    docs = _docs(50, 1)
    raw = _jsonl(docs).rstrip(b"\n")
    (tmp_path / "d.jsonl").write_bytes(raw)
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(raw))
    val = {}
    for name in ("d.jsonl", "d.jsonl.zst", "d.jsonl.gz"):
        out = tmp_path / f"ds-{name}"
        assert _prepare(tmp_path / name, "--val-split", "5", "--chunk-mb", "0.0625", "--out", out) == 0, \
            capsys.readouterr().err
        m = json.loads((out / "manifest.json").read_text())
        assert (m["splits"]["val"]["documents"], m["splits"]["train"]["documents"]) == (5, 45), name
        val[name] = decode_slice(out, "val", 0, Dataset.open(out).num_tokens("val"))
    assert val["d.jsonl.zst"] == val["d.jsonl"] == val["d.jsonl.gz"]
    assert _prepare(tmp_path / "d.jsonl.zst", "--val-split", "50", "--out", tmp_path / "all") == 2
    assert "the corpus has only 50 documents" in capsys.readouterr().err


def test_missing_optional_dependency_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib
    from dist_gpt.data import streams

    real = importlib.import_module

    def without_pyarrow(name, *args):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *args)

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p.parquet")
    monkeypatch.setattr(streams.importlib, "import_module", without_pyarrow)
    assert _prepare(tmp_path / "p.parquet", "--out", tmp_path / "ds") == 2
    err = capsys.readouterr().err
    assert "needs pyarrow: pip install 'dist_gpt[corpora]'" in err and err.count("\n") == 1
