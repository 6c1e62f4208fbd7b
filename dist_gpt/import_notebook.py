"""dist-gpt-import-notebook: bring the original notebook's `model-01.pkl` into dist_gpt.

    dist-gpt-import-notebook model-01.pkl --vocab vocab.txt --out runs/notebook-import
    python -m tools.import_notebook model-01.pkl --vocab vocab.txt --out runs/notebook-import   # the same, from the repository
    python -m dist_gpt.sample --run runs/notebook-import --prompt "Once upon a time"
    torchrun --standalone --nproc_per_node=8 -m dist_gpt.train --preset seed --data.path data/notebook \\
        --init-from runs/notebook-import   # printed for your model

The pickle is read without running anything from it (see dist_gpt/notebook.py and
docs/FROM-THE-NOTEBOOK.md); a file naming any other global is refused. Writes a weights-only
checkpoint `OUT/checkpoints/step_0000000/` and `OUT/model.safetensors`; never overwrites them.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from dist_gpt.convert.notebook import import_notebook
from dist_gpt.errors import UserError


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="dist-gpt-import-notebook", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pickle", help="the notebook's model file, written by pickle.dump(model, f)")
    p.add_argument("--vocab", required=True, help="the notebook's vocab.txt (ids = its sorted set of characters)")
    p.add_argument("--out", required=True, help="run directory to create (checkpoint + model.safetensors)")
    p.add_argument("--data", default="data/notebook",
                   help="the dataset made by dist-gpt-prepare from the notebook's files, for the printed train "
                        "command (default data/notebook)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        r = import_notebook(args.pickle, args.vocab, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = r.model
    print(f"imported {args.pickle} (nothing in it was run): {m['n_layer']} post-norm blocks, {m['n_head']} heads "
          f"of {m['head_dim']}, width {m['n_embd']}, context {m['block_size']}, vocabulary {m['vocab_size']}, "
          f"{r.params:,} parameters")
    print(f"  checkpoint  {r.checkpoint}")
    print(f"  export      {r.safetensors}")
    out = shlex.quote(str(r.run_dir))
    train = ["--preset seed", f"--data.path {shlex.quote(args.data)}", f"--init-from {out}", *r.train_overrides]
    print("next:")
    print(f"  python -m dist_gpt.sample --run {out}")
    # The seed preset splits the notebook's batch of 48 as 6 sequences per GPU on 8 GPUs.
    print(f"  torchrun --standalone --nproc_per_node=8 -m dist_gpt.train {' '.join(train)}")
    print(f"  sbatch slurm/train.sh {' '.join(train)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
