"""Add this machine's record to tests/assets/classic_losses.json, so the recorded-losses test holds it bitwise here.

    python tests/record_losses.py          (from the repository root; about 10 s)

It runs the record's own arguments on the record's dataset, checks the losses agree with the first record
within its tolerance (a larger difference is a changed recipe, not another machine, and is refused), and
appends them under this machine's fingerprint (tests/machine.py). A fingerprint already recorded is left alone.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: conftest and machine beside it

from conftest import ASSETS, REPO, _env  # noqa: E402
from machine import fingerprint  # noqa: E402
from test_recipes import RECORD, classic_record_run  # noqa: E402


def main() -> int:
    import subprocess

    record = json.loads(RECORD.read_text())
    here = fingerprint(threads=1)
    if any(rec["machine"] == here for rec in record["records"]):
        print(f"{RECORD} already holds a record for {here}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "licenses"
        subprocess.run([sys.executable, "-m", "tools.prepare", str(ASSETS / "licenses.txt"), "--tokenizer", "byte",
                        "--out", str(data)], check=True, capture_output=True, env=_env(), cwd=REPO)
        train, val = classic_record_run(data, Path(tmp) / "run")
    first = record["records"][0]
    worst = max(abs(train[int(s)] - v) / abs(v) for s, v in first["train_loss"].items())
    if worst > record["tolerance"]:
        print(f"refused: the losses differ from the first record by {worst:.2e} (relative), more than the "
              f"tolerance {record['tolerance']}: the recipe changed, this is not a new machine")
        return 1
    record["records"].append({"machine": here, "train_loss": {str(k): v for k, v in train.items()},
                              "val_loss": {str(k): v for k, v in val.items()}})
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"added the record of {here} to {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
