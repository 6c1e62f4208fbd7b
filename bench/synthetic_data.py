"""A synthetic, learnable byte dataset for the checks that need tokens but no corpus (bench/gpu_check.py).

    python -m bench.synthetic_data OUT_DIR [--tokens 4000000]

The text is a word chain: 256 random "words" of 2-7 printable bytes, each followed by one of 4
fixed successors, cut into documents of 200-2,000 bytes (each with its start in the document index,
so `--model.doc_mask=true` and `--data.align=document` work on it). A model that learns the chain
gets from ln(256) = 5.5 nats per byte at the start to about ln(4) / 4.5 ~ 0.3, so a loss curve
on it must fall; the byte vocabulary fits any preset's model (gpt2-124m pads it to 50,304).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dist_gpt.data.tokenizers import ByteTokenizer
from dist_gpt.data.writer import DatasetWriter

WORDS, SUCCESSORS = 256, 4


def _split_tokens(rng: np.random.Generator, words: list[np.ndarray], successors: np.ndarray,
                  tokens: int) -> tuple[np.ndarray, list[int]]:
    """About `tokens` bytes of the chain, and the offsets where its documents start."""
    pieces, starts, n = [], [], 0
    while n < tokens:
        starts.append(n)
        doc_end = n + int(rng.integers(200, 2000))
        w = int(rng.integers(WORDS))
        choices = rng.integers(SUCCESSORS, size=1000)  # enough draws for any document
        i = 0
        while n < doc_end:
            pieces.append(words[w])
            n += words[w].size
            w = int(successors[w, choices[i % choices.size]])
            i += 1
    return np.concatenate(pieces), starts


def synthetic_dataset(directory: Path | str, tokens: int = 4_000_000, seed: int = 0) -> Path:
    """Write the word-chain dataset (`tokens` train bytes, a tenth as many for validation) once;
    a directory that already holds it is kept."""
    directory = Path(directory)
    if (directory / "manifest.json").exists():
        return directory
    rng = np.random.default_rng(seed)
    words = [rng.integers(33, 127, int(rng.integers(2, 8)), dtype=np.uint8) for _ in range(WORDS)]
    successors = rng.integers(WORDS, size=(WORDS, SUCCESSORS))
    writer = DatasetWriter(directory, ByteTokenizer())
    for split, count in (("train", tokens), ("val", max(tokens // 10, 20_000))):
        data, starts = _split_tokens(rng, words, successors, count)
        writer.write(split, data, source_bytes=data.size, doc_starts=starts)
    writer.finish({"kind": "synthetic word chain", "seed": seed})
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="dataset directory to write")
    p.add_argument("--tokens", type=int, default=4_000_000, help="train tokens (bytes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(synthetic_dataset(args.out, args.tokens, args.seed))


if __name__ == "__main__":
    main()
