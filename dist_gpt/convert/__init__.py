"""Conversions in one home: a model's weights, config and tokenizer from a run, checkpoint, export,
Hugging Face directory or the notebook's pickle (weights.py, hf/, notebook.py), and the .safetensors
export (export.py). Pure functions over state dicts and configs; never imports the trainer."""
