"""Training data: JSON-lines readers, parallel tokenization into memory-mapped
shards, packing into fixed-length sequences with cu_seqlens, SFT packing,
weighted resumable mixtures, a no-download corpus (the stdlib sources), and
Llama 2's Ghost Attention samples (mixkit.data.gatt).

The batch every loader yields (see packing.collate), for Transformer.forward's
packed path: input_ids (1, T) int64, labels (1, T) int64 with -100 where no
loss is taken, cu_seqlens (N + 1,) int32 from 0 to T, max_seqlen int, and
from MixtureLoader also "components" (one name per packed sequence).
"""
from .gatt import gatt_example, gatt_examples, sample_instruction, sampling_messages
from .mixture import Component, MixtureLoader, build_mixture
from .packing import (IGNORE_INDEX, DocumentTooLongError, PackedStream, collate, sft_documents, sft_example,
                      sft_stream)
from .readers import DataError, read_documents
from .stdlib_corpus import SourceFile, stdlib_documents
from .token_files import Documents, open_shard, token_dtype, tokenize_files, tokenize_texts

__all__ = ["gatt_example", "gatt_examples", "sample_instruction", "sampling_messages", "Component", "MixtureLoader", "build_mixture", "IGNORE_INDEX", "DocumentTooLongError", "PackedStream",
           "collate", "sft_documents", "sft_example", "sft_stream", "DataError", "read_documents", "SourceFile",
           "stdlib_documents", "Documents", "open_shard", "token_dtype", "tokenize_files", "tokenize_texts"]
