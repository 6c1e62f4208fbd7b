"""Re-exports dist_gpt.convert.weights under its old path `dist_gpt.weights` (nothing in the package imports it)."""

from dist_gpt.convert.hf.convert import gpt_config
from dist_gpt.convert.weights import (EXPORT_FORMAT, KEY_CONFIG, KEY_CRC32, KEY_DATASET, KEY_FORMAT, KEY_HEADER_CRC32,
                                      KEY_SOURCE, KEY_STEP, KEY_TOKENIZER_FILE, KEY_TOKENIZER_JSON,
                                      KEY_TOKENIZER_SPEC, KEY_VAL_LOSS, InitFrom, LoadedWeights, add_source_arguments,
                                      dataset_tokenizer, header_crc32, init_from, load_model, load_weights,
                                      model_prefix, tensors_crc32)

__all__ = ["gpt_config", "EXPORT_FORMAT", "KEY_CONFIG", "KEY_CRC32", "KEY_DATASET", "KEY_FORMAT", "KEY_HEADER_CRC32",
           "KEY_SOURCE", "KEY_STEP", "KEY_TOKENIZER_FILE", "KEY_TOKENIZER_JSON", "KEY_TOKENIZER_SPEC", "KEY_VAL_LOSS", "InitFrom",
           "LoadedWeights", "add_source_arguments", "dataset_tokenizer", "header_crc32", "init_from", "load_model",
           "load_weights", "model_prefix", "tensors_crc32"]
