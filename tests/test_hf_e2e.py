"""The Hugging Face path end to end, as the README tells it: a GPT-2 directory with its
tokenizer.json -> tools.prepare with that tokenizer -> fine-tune on 2 ranks with --init-from and an
eval.tasks multiple-choice file -> export --format hf -> lm-evaluation-harness.

lm-eval's own `hf` model (`lm_eval --model hf`, a separate code path that dist_gpt never calls)
must give the same acc and acc_norm on the exported directory as dist_gpt's in-training
evaluation logged for the same weights, and the same log-likelihood for every ending;
`python -m dist_gpt.evaluate --tasks` (lm-eval's Python API) must agree too.

    python -m pytest tests/test_hf_e2e.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, EXACT, REPO, _env, require, run_train  # noqa: E402

require("transformers")  # both in the dev extra: CI always runs this
require("lm_eval")

TASK_DIR = ASSETS / "mc_task"
TASK_FILE = TASK_DIR / "mc_task.jsonl"


def offline_env(tmp_path: Path) -> dict:
    return _env({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"})


def gpt2_directory(tmp_path: Path) -> Path:
    """A tiny random GPT-2 saved by transformers, with a byte-level BPE tokenizer.json of its own."""
    from transformers import GPT2Config, GPT2LMHeadModel

    bpe = tmp_path / "bpe"
    subprocess.run([sys.executable, "-m", "tools.prepare", str(ASSETS / "licenses.txt"), "--tokenizer", "bpe:400",
                    "--out", str(bpe)], check=True, capture_output=True, env=_env(), cwd=REPO)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    out = tmp_path / "gpt2"
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((bpe / "tokenizer.json").read_bytes())
    return out


def lm_eval_samples(out_dir: Path) -> tuple[dict, dict[int, list[float]]]:
    """(results of the task, doc_id -> the log-likelihood of each ending) from lm_eval's --output_path."""
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]["dist_gpt_mc"]
    samples = [json.loads(line) for line in next(out_dir.rglob("samples_dist_gpt_mc_*.jsonl")).read_text().splitlines()]
    return results, {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}


@pytest.mark.slow
def test_gpt2_finetune_export_and_lm_eval_agree(tmp_path):
    env = offline_env(tmp_path)
    gpt2 = gpt2_directory(tmp_path)
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "tools.prepare", str(ASSETS / "licenses.txt"), "--tokenizer",
                    str(gpt2 / "tokenizer.json"), "--out", str(data)], check=True, capture_output=True, env=env,
                   cwd=REPO)

    # fine-tune on 2 ranks from the GPT-2 directory, scoring the task at the start and at the end
    run = tmp_path / "run"
    out = run_train([*EXACT, "--init-from", str(gpt2), "--data.path", str(data), "--train.run_dir", str(run),
                     "--model.block_size=64", "--train.steps=4", "--eval.interval=0", "--eval.max_blocks=4",
                     f"--eval.tasks={TASK_FILE}"], nproc=2, env=env)
    assert f"initialised the weights from {gpt2}" in out.stdout
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["n_embd"], saved["vocab_size"], saved["mlp"], saved["bias"]) == (48, 400, "gelu_tanh", True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "val/mc_task/acc_norm" in r}
    assert sorted(logged) == [0, 4]

    # export the final weights (the same the last evaluation scored) and score them with lm-eval
    export = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "dist_gpt.export", "--checkpoint", str(run), "--format", "hf",
                    "--out", str(export)], check=True, capture_output=True, env=env, cwd=REPO)
    lm_out = tmp_path / "lm-eval"
    cli = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={export},dtype=float32", "--tasks", "dist_gpt_mc", "--include_path", ".",
                          "--device", "cpu", "--batch_size", "8", "--output_path", str(lm_out), "--log_samples"],
                         capture_output=True, text=True, env=env, cwd=TASK_DIR, timeout=600)
    assert cli.returncode == 0, cli.stderr[-4000:]
    results, lls = lm_eval_samples(lm_out)
    assert results["acc_norm,none"] == pytest.approx(logged[4]["val/mc_task/acc_norm"], abs=1e-12)
    assert results["acc,none"] == pytest.approx(logged[4]["val/mc_task/acc"], abs=1e-12)

    # every ending's log-likelihood, dist_gpt's scorer on the exported model read back by dist_gpt
    from dist_gpt.data.tokenizers import HFTokenizer
    from dist_gpt.model.gpt import GPT
    from dist_gpt.parallel.precision import Precision
    from dist_gpt.training.tasks import ChoiceTask
    from dist_gpt.convert.weights import load_weights

    loaded = load_weights(export)
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict)
    task = ChoiceTask(TASK_FILE, HFTokenizer(export / "tokenizer.json", "gpt2"), loaded.config.block_size,
                      loaded.eot_id, batch_size=8)
    ours = task.loglikelihoods(model, Precision("fp32", torch.device("cpu")).autocast(), task.examples)
    assert sorted(lls) == list(range(len(ours)))
    for doc_id, ll in enumerate(ours):
        torch.testing.assert_close(ll, torch.tensor(lls[doc_id], dtype=torch.float64), atol=1e-4, rtol=0)

    # python -m dist_gpt.evaluate --tasks: lm-eval through its Python API, on the run itself
    report = tmp_path / "harness.json"
    api = subprocess.run([sys.executable, "-m", "dist_gpt.evaluate", "--run", str(run), "--tasks", "dist_gpt_mc",
                          "--include-path", ".", "--batch-size", "8", "--device", "cpu", "--output", str(report)],
                         capture_output=True, text=True, env={**env, "PYTHONPATH": f"{REPO}{os.pathsep}{env['PYTHONPATH']}"},
                         cwd=TASK_DIR, timeout=600)
    assert api.returncode == 0, api.stderr[-4000:]
    assert "acc_norm" in api.stdout
    assert json.loads(report.read_text())["results"]["dist_gpt_mc"]["acc_norm,none"] == results["acc_norm,none"]


@pytest.mark.slow
def test_eval_tasks_keep_sharded_ranks_in_step(tiny_data, tmp_path):
    """Under fsdp every forward pass gathers parameters, so the ranks must run as many as each other:
    5 examples split 3 / 2 give the ranks 6 and 4 batches of 2 endings; the shorter pads (a hang
    otherwise) and the scores equal one process scoring the final checkpoint."""
    from dist_gpt.model.gpt import GPT
    from dist_gpt.parallel.precision import Precision
    from dist_gpt.training.tasks import ChoiceTask
    from dist_gpt.convert.weights import load_weights

    task_file = tmp_path / "five.jsonl"
    task_file.write_text("".join(TASK_FILE.read_text().splitlines(keepends=True)[:5]))
    run = tmp_path / "run"
    run_train([*EXACT, f"--data.path={tiny_data}", f"--train.run_dir={run}", "--parallel.data=fsdp",
               "--recipe", "classic", "--train.steps=2", "--eval.interval=0", "--eval.at_start=false",
               "--model.block_size=128",  # byte level: the longest ending here is 100 bytes
               f"--eval.tasks={task_file}"], nproc=2, timeout=600)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in logged if "val/five/acc_norm" in r)
    loaded = load_weights(run)
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict)
    task = ChoiceTask(task_file, loaded.tokenizer, loaded.config.block_size, loaded.eot_id, batch_size=2)
    alone = task.score(model, Precision("fp32", torch.device("cpu")).autocast())
    assert alone["examples"] == 5
    assert (logged["val/five/acc"], logged["val/five/acc_norm"]) == (alone["acc"], alone["acc_norm"])
