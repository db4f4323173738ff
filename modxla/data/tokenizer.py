"""sentencepiece tokenizers: training on a source, loading, and the per-source cache."""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import sentencepiece as spm

from modxla.config import DataConfig
from modxla.data.sources import DataError, iter_text, load_documents, source_signature

EOS_ID = 2  # the document separator: sentencepiece's </s>
MAX_TRAIN_CHARS = 20_000_000  # plenty for a tokenizer; keeps training under a minute


def _lines(texts, max_chars: int):
    """Non-empty lines of the documents; sentencepiece trains on sentences, not whole files."""
    for text in iter_text(texts, max_chars):
        for line in text.split("\n"):
            if line.strip():
                yield line


def trainer_settings(vocab_size: int, model_type: str = "bpe") -> dict:
    """Every option `train_tokenizer` gives sentencepiece's trainer, but the corpus and output.

    The tokenizer cache key is built from this, so a changed option trains a new tokenizer.
    """
    return dict(
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        eos_id=EOS_ID,
        bos_id=-1,
        byte_fallback=True,  # every UTF-8 string encodes, so decode(encode(s)) == s
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=["\n", "\t", "    "],
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=True,
    )


def train_tokenizer(
    texts, out_path: str | Path, vocab_size: int, model_type: str = "bpe", max_chars: int = 0
) -> Path:
    """Train on an iterable of rows with a `text` field; writes `out_path` (.model) atomically."""
    out = Path(out_path).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, max_chars or MAX_TRAIN_CHARS),
            model_prefix=str(tmp),
            minloglevel=2,
            **trainer_settings(vocab_size, model_type),
        )
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed on this corpus: {e}") from None
    os.replace(f"{tmp}.model", f"{out}.model")
    os.replace(f"{tmp}.vocab", f"{out}.vocab")
    return Path(f"{out}.model")


@lru_cache(maxsize=8)
def load_tokenizer(path: str, vocab_size: int | None = None) -> spm.SentencePieceProcessor:
    """Load a .model file; with `vocab_size`, refuse one that does not match the model."""
    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer: no such file: {path}")
    sp = spm.SentencePieceProcessor(model_file=path)
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise DataError(
            f"data.tokenizer: {path} has {sp.vocab_size()} pieces but model.vocab_size is "
            f"{vocab_size}; retrain the tokenizer or change model.vocab_size"
        )
    return sp


def file_digest(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def tokenizer_key(cfg: DataConfig, vocab_size: int) -> dict:
    """What a tokenizer trained on `cfg`'s source depends on: the corpus' signature (files,
    sizes, mtimes; or the hub name, config and split), `text_field`, the characters read for
    training, and every trainer setting."""
    return {
        "corpus": source_signature(cfg),
        "train_chars": cfg.max_chars or MAX_TRAIN_CHARS,  # what train_tokenizer reads
        "trainer": trainer_settings(vocab_size, cfg.tokenizer_type),
    }


def default_tokenizer_path(cfg: DataConfig, vocab_size: int) -> Path:
    key = json.dumps(tokenizer_key(cfg, vocab_size), sort_keys=True)
    name = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(os.path.expanduser(cfg.cache_dir)) / "tokenizers" / f"{name}.model"


def resolve_tokenizer(cfg: DataConfig, vocab_size: int) -> str:
    """`data.tokenizer` if set, else one trained on the source once and cached."""
    if cfg.tokenizer:
        return os.path.expanduser(cfg.tokenizer)
    path = default_tokenizer_path(cfg, vocab_size)
    if not path.exists():
        train_tokenizer(
            load_documents(cfg), path, vocab_size, cfg.tokenizer_type, max_chars=cfg.max_chars
        )
    return str(path)
