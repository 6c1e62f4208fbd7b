"""Export a checkpoint's model as one .safetensors file, or as a Hugging Face model directory.

    python -m dist_gpt.export --checkpoint runs/cpu --out model.safetensors            # the run's latest
    python -m dist_gpt.export --checkpoint runs/cpu --best --out best.safetensors      # its best by val loss
    python -m dist_gpt.export --checkpoint runs/cpu/checkpoints/step_0001000 --out model.safetensors
    python -m dist_gpt.export --checkpoint runs/cpu --format hf --out exports/cpu      # for transformers, lm-eval

The file holds the model's tensors only (no optimizer state) and, in its string table, the
GPTConfig, the dataset's identity, the tokenizer's spec and, for a tokenizer.json tokenizer, the
file's text; that file is also written beside the export as `<name>.tokenizer.json`. Read it back
with `python -m dist_gpt.sample --model model.safetensors` or `dist_gpt.convert.weights.load_weights`.
`--format hf` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load offline: the classic recipe as GPT-2, the modern one as
Qwen3 (Llama without qk_norm); see dist_gpt/convert/hf/export.py and docs/INTEROP.md.
An existing output is never overwritten unless --force is given.
"""

from __future__ import annotations

import argparse
import sys

from .convert.export import export, export_tokenizer

# The old path dist_gpt.export.export keeps importing.
__all__ = ["export", "export_tokenizer", "main", "run"]
from .parallel import dist


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dist_gpt.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest), a checkpoint directory, an "
                   "exported .safetensors or a Hugging Face model directory")
    p.add_argument("--out", required=True, help="the .safetensors file to write (--format hf: a directory)")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors: one dist_gpt file (default); hf: a Hugging Face model directory")
    p.add_argument("--best", action="store_true", help="with a run directory: its best checkpoint by val loss")
    p.add_argument("--force", action="store_true", help="overwrite --out (and its tokenizer file) if it exists; "
                   "--format hf: replace the model files in the directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)



def run(argv: list[str]) -> int:
    args = parse_args(argv)
    export(args.checkpoint, args.out, "best" if args.best else "latest", args.force, args.format, args.quiet)
    return 0


def main(argv: list[str] | None = None) -> None:
    dist.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
