"""Write a dist_gpt model as a Hugging Face model directory (`python -m dist_gpt.export --format hf`).

    DIR/config.json            the HF architecture's keys, plus dist_gpt's own settings under "dist_gpt"
                               (with the CRC32 of model.safetensors, which dist_gpt checks on reading)
    DIR/model.safetensors      the weights under the architecture's names (float32, as trained)
    DIR/tokenizer.json         the dataset's tokenizer as an HF tokenizer (dist_gpt/convert/hf/tokenizer.py)
    DIR/tokenizer_config.json  PreTrainedTokenizerFast, end-of-text as bos/eos (byte, char: a declared
                               bos, for lm-eval), no added BOS

`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it with
no network and no trust_remote_code; `--init-from DIR`, `dist_gpt.sample --model DIR` and
`dist_gpt.convert.weights.load_weights(DIR)` read it back bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .convert import EMBEDDED, export_model
from .files import write_model_dir
from .tokenizer import tokenizer_files

FORMAT = "2"  # 2 records the CRC32 of model.safetensors (files.WEIGHTS_CRC32); "1" is still read


def write_export(loaded, spec: dict | None, tokenizer_json: str | None, out: str | Path, force: bool) -> list[Path]:
    """Write `loaded` (a dist_gpt.convert.weights.LoadedWeights) to the directory `out`; return the files written.
    `spec`/`tokenizer_json` describe its tokenizer (None: exported without one)."""
    cfg = loaded.config
    hf, tensors = export_model(cfg, loaded.state_dict)
    carried = spec is not None and not (spec.get("kind") == "hf" and tokenizer_json is None)
    files = tokenizer_files(spec, tokenizer_json, loaded.eot_id, cfg.block_size) if carried else {}
    dtypes = {t.dtype for t in tensors.values()}
    hf |= {"dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"}
    if loaded.eot_id is not None:
        hf |= {"bos_token_id": loaded.eot_id, "eos_token_id": loaded.eot_id}
    hf[EMBEDDED] = {"format": FORMAT, "model": asdict(cfg), "dataset": loaded.dataset, "tokenizer_spec": spec,
                    "step": loaded.step, "val_loss": loaded.val_loss, "source": str(loaded.source)}
    return write_model_dir(Path(out), hf, tensors, files, force)
