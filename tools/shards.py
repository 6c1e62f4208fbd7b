"""python -m tools.shards: verify, summarize or decode a dataset (see dist_gpt/data/shard_tools.py).

    python -m tools.shards verify data/stdlib
    python -m tools.shards stats data/stdlib
    python -m tools.shards decode data/stdlib --split val --start 0 --count 400
"""

import sys

from dist_gpt.data.shard_tools import main

if __name__ == "__main__":
    sys.exit(main())
