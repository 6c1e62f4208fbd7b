"""Hugging Face interop: start from GPT-2, Llama, Qwen2 or Qwen3 weights; hand dist_gpt models to transformers.

    python -m tools.prepare mytext.txt --tokenizer models/gpt2/tokenizer.json --out data/mytext
    torchrun --standalone --nproc_per_node=2 -m dist_gpt.train --init-from models/gpt2 --data.path data/mytext
    python -m dist_gpt.export --checkpoint runs/cpu --format hf --out exports/cpu   # AutoModelForCausalLM loads it
    python -m dist_gpt.sample --model models/gpt2 --prompt "Hello"

A Hugging Face model directory is `config.json` plus `model.safetensors` (or shards and
`model.safetensors.index.json`). Reading and writing one needs only safetensors and JSON:
`transformers` is never imported here. The conversions are pure functions over configs and state
dicts (`convert.py`), one module per architecture family (`gpt2.py`, `llama.py`) listing how each
tensor maps (`links.py`); `tokenizer.py` writes dist_gpt's tokenizers as `tokenizer.json`.
See docs/INTEROP.md.
"""

from .convert import (ARCHS, EMBEDDED, export_config, export_model, init_model_config, init_state_dict,
                      model_config, read_hf_config, read_model)
from .files import is_model_dir

__all__ = ["ARCHS", "EMBEDDED", "export_config", "export_model", "init_model_config", "init_state_dict", "is_model_dir",
           "model_config", "read_hf_config", "read_model"]
