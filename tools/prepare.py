"""python -m tools.prepare: build a dataset of token shards (see dist_gpt/data/prepare.py).

    python -m tools.prepare --source stdlib --tokenizer byte --out data/stdlib
    python -m tools.prepare corpus/ --tokenizer bpe:8192 --out data/mine
    python -m tools.prepare --train train_split.txt --val val_split.txt --tokenizer char --vocab vocab.txt --out data/notebook
"""

import sys

from dist_gpt.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
