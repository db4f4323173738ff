"""Data: sources (HF datasets), sentencepiece tokenizers, packing, resumable sharded batches."""

from modxla.data.loader import BatchLoader
from modxla.data.pipeline import TokenStreams, build_streams, split_documents
from modxla.data.sources import DataError, load_documents
from modxla.data.tokenizer import EOS_ID, load_tokenizer, resolve_tokenizer, train_tokenizer

__all__ = [
    "EOS_ID",
    "BatchLoader",
    "DataError",
    "TokenStreams",
    "build_streams",
    "load_documents",
    "load_tokenizer",
    "resolve_tokenizer",
    "split_documents",
    "train_tokenizer",
]
