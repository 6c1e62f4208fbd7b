"""Re-exports dist_gpt.model.doc_mask under its old path `dist_gpt.doc_mask` (nothing in the package imports it)."""

from dist_gpt.model.doc_mask import (block_mask, document_mask, eot_documents, flex, flex_usable, one_document_per_row)

__all__ = ["block_mask", "document_mask", "eot_documents", "flex", "flex_usable", "one_document_per_row"]
