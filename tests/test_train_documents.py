"""Document-aware training end to end: blocks at document starts and attention inside documents,
on 2 ranks, resumed exactly after a stop signal; a dataset without a document index is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ASSETS, EXACT, REPO, _env, final, losses, run_train
from tests.data_fixtures import as_version_1

DOCS = ["--data.align=document", "--model.doc_mask=true"]


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    """The license texts of tests/assets cut at blank lines: ~700 documents of ~100 bytes, byte level."""
    root = tmp_path_factory.mktemp("paragraphs")
    text = (ASSETS / "licenses.txt").read_text(encoding="utf-8")
    docs = [p.strip() + "\n" for p in text.split("\n\n") if p.strip()]
    (root / "p.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "tools.prepare", str(root / "p.jsonl"), "--out", str(root / "ds"), "--quiet"],
                   check=True, env=_env(), cwd=REPO)
    return root / "ds"


@pytest.mark.slow
def test_two_ranks_with_documents_resume_exactly(paragraphs, tmp_path):
    args = [*EXACT, *DOCS, f"--data.path={paragraphs}", "--train.steps=12"]
    run_train([*args, f"--train.run_dir={tmp_path / 'ref'}"], nproc=2)
    reference = losses(tmp_path / "ref")
    assert final(tmp_path / "ref")["step"] == 12
    run = tmp_path / "run"
    run_train([*args, f"--train.run_dir={run}"], nproc=2, env={"DIST_GPT_FAULT_SIGNAL_AT": "5:SIGUSR1"})
    assert json.loads((run / "requeue.json").read_text())["step"] == 6
    run_train([*args, f"--train.run_dir={run}"], nproc=2)  # the requeued job resumes from step 6
    got = losses(run)
    assert [got[s] for s in range(1, 13)] == [reference[s] for s in range(1, 13)]
    meta = json.loads((run / "checkpoints" / "step_0000012" / "meta.json").read_text())
    assert meta["batches"]["align"] == "document"


def test_document_options_need_a_document_index(tiny_data, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    as_version_1(manifest)
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            (old / shard["file"]).symlink_to(tiny_data / shard["file"])
    (old / "manifest.json").write_text(json.dumps(manifest))
    out = run_train(["--preset", "debug", f"--data.path={old}", "--model.doc_mask=true",
                     f"--train.run_dir={tmp_path / 'r'}"], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "no document index" in line and "model.doc_mask needs" in line and "--force" in line
