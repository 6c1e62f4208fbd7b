"""lm-eval scores an export of every kind of tokenizer with no extra arguments, and its scores equal
dist_gpt's own multiple-choice scorer (dist_gpt/tasks.py) on the same model and task.

    python -m pytest tests/test_hf_lm_eval.py -q -x

byte and char tokenizers have no end-of-text token, so their exports declare a bos token that
encodes as dist_gpt does (dist_gpt/hf/tokenizer.py `prefix_token`); lm-eval's `hf` model needs one
(its `prefix_token_id`) and failed with "TypeError: 'None' is not an instance of 'Sequence'" before.
Tiny random models: the scores are those of noise, but two code paths must compute the same ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, REPO, require

from dist_gpt.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer
from dist_gpt.convert.hf.export import write_export
from dist_gpt.model.gpt import GPT, GPTConfig
from dist_gpt.parallel.precision import Precision
from dist_gpt.training.tasks import ChoiceTask
from dist_gpt.convert.weights import LoadedWeights

TASK_DIR = ASSETS / "mc_task"
TASK_FILE = TASK_DIR / "mc_task.jsonl"


def offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIST_GPT_FAULT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return env


def user_tokenizer(directory: Path) -> Path:
    """A user's own tokenizer.json with no end-of-text token, only a special "<pad>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(ASSETS / "licenses.txt")], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def tokenizers_under_test(tmp_path: Path) -> dict:
    from dist_gpt.data.prepare import PrepareOptions, prepare

    bpe = prepare(PrepareOptions(out=str(tmp_path / "bpe"), inputs=[str(ASSETS / "licenses.txt")], tokenizer="bpe:300",
                                 progress=False, workers=1))
    task_text = "".join(json.dumps(json.loads(line), ensure_ascii=False) for line in TASK_FILE.read_text().splitlines())
    return {"byte": ByteTokenizer(), "char": CharTokenizer("".join(sorted(set(task_text + " ")))),
            "bpe": HFTokenizer(bpe / "tokenizer.json", "bpe:300"),
            "user": HFTokenizer(user_tokenizer(tmp_path / "user"), "user.json")}


def export_random_model(tok, out: Path, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=160, n_layer=1, n_head=2, n_embd=32,
                          positions="learned", norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # logits far from uniform, so the endings' scores differ
    dataset = {"tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint, "eot_id": tok.eot_id}
    text = tok.path.read_text() if isinstance(tok, HFTokenizer) else None
    loaded = LoadedWeights(model.cfg, model.state_dict(), Path("test"), 1, None, dataset, tok.spec, text)
    write_export(loaded, tok.spec, text, out, force=False)
    return model.eval()


def our_scores(model: GPT, tok) -> dict:
    task = ChoiceTask(TASK_FILE, tok, model.cfg.block_size, tok.eot_id, batch_size=8)
    return task.score(model, Precision("fp32", torch.device("cpu")).autocast())


@pytest.mark.slow
def test_lm_eval_scores_exports_of_every_tokenizer_as_dist_gpt_does(tmp_path):
    require("lm_eval")
    exports, ours = {}, {}
    for seed, (name, tok) in enumerate(tokenizers_under_test(tmp_path).items()):
        exports[name] = tmp_path / f"export-{name}"
        ours[name] = our_scores(export_random_model(tok, exports[name], seed), tok)
        assert json.loads((exports[name] / "tokenizer_config.json").read_text()).get("bos_token"), name

    # plain lm_eval on the byte export (the README's default job): no prefix_token_id, no extra argument
    out = tmp_path / "lm-eval-byte"
    cli = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={exports['byte']}", "--tasks", "dist_gpt_mc", "--include_path", ".",
                          "--device", "cpu", "--batch_size", "8", "--output_path", str(out)],
                         capture_output=True, text=True, env=offline_env(), cwd=TASK_DIR, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["dist_gpt_mc"]
    assert (results["acc,none"], results["acc_norm,none"]) == (ours["byte"]["acc"], ours["byte"]["acc_norm"])

    # python -m dist_gpt.evaluate --model EXPORT --tasks (lm-eval's Python API) on the others
    script = ("import json, sys\nfrom dist_gpt.harness import TaskOptions, run_tasks\n"
              "opts = TaskOptions('dist_gpt_mc', '.', batch_size=8, device='cpu', precision='fp32')\n"
              "print(json.dumps({d: run_tasks(d, opts)['dist_gpt_mc']"
              " for d in sys.argv[1:]}))")
    names = ["char", "bpe", "user"]
    api = subprocess.run([sys.executable, "-c", script, *(str(exports[n]) for n in names)], capture_output=True,
                         text=True, env=offline_env(), cwd=TASK_DIR, timeout=600)
    assert api.returncode == 0, api.stderr[-3000:]
    scored = json.loads(api.stdout.strip().splitlines()[-1])
    for name in names:
        theirs = scored[str(exports[name])]
        assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours[name]["acc"], ours[name]["acc_norm"]), name
