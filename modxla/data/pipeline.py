"""Tokenize, split and pack a source into fixed-length sequences, cached on disk.

Documents are tokenized in batches by `datasets.map` (multi-process, cached by fingerprint),
split into train/validation by a seeded permutation of documents, and concatenated with an
EOS separator after each document into one flat token stream per split (an int32 file). A
stream of L tokens is read as L // (T+1) sequences of T+1 tokens (inputs and shifted targets);
the final partial sequence of each split is dropped.

The packed cache (<cache>/packed/<key>/: train.bin, val.bin, meta.json) is built in a
temporary folder beside it, flushed to disk and renamed into place whole, so a build killed
midway leaves no folder under the key. A folder that is there but does not add up (meta.json
unreadable, a .bin of another size than meta.json says: damage, or a cache written before the
rename) is rebuilt with a note, never read as data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from modxla.config import DataConfig
from modxla.data.sources import (
    DataError,
    fsync_file,
    iter_text,
    load_documents,
    note,
    remove_stale,
)
from modxla.data.tokenizer import EOS_ID, file_digest, load_tokenizer, resolve_tokenizer

SPLITS = ("train", "val")


def _tokenize_batch(batch: dict, model_path: str, digest: str) -> dict:
    # `digest` is unused here but enters the map fingerprint: a new tokenizer re-tokenizes.
    sp = load_tokenizer(model_path)
    ids = sp.encode(batch["text"])
    return {"ids": ids, "n": [len(x) + 1 for x in ids]}


def split_documents(num_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (num_docs,): True for validation documents, from a seeded permutation."""
    is_val = np.zeros(num_docs, dtype=bool)
    if val_fraction > 0 and num_docs > 1:
        n_val = min(num_docs - 1, max(1, math.ceil(val_fraction * num_docs)))
        is_val[np.random.default_rng(seed).permutation(num_docs)[:n_val]] = True
    return is_val


@dataclass
class TokenStreams:
    """The packed corpus: one flat int32 token stream per split, and the tokenizer used."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: str
    source: str

    def sequences(self, split: str, seq_len: int) -> np.ndarray:
        """(N, seq_len + 1) read-only view; the error names the source if N would be 0."""
        stream = getattr(self, split)
        n = len(stream) // (seq_len + 1)
        if n == 0:
            hint = " (raise data.val_fraction)" if split == "val" else ""
            raise DataError(
                f"data.source: the {split} split of {self.source} has {len(stream)} tokens, "
                f"fewer than one sequence of data.seq_len+1 = {seq_len + 1}{hint}"
            )
        return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _materialize(ds, cfg: DataConfig) -> datasets.Dataset:
    if isinstance(ds, datasets.Dataset):
        return ds
    if not cfg.max_chars:
        raise DataError("data.max_chars: a streamed source needs a cap on characters read")
    texts = list(iter_text(ds, cfg.max_chars))
    return datasets.Dataset.from_dict({"text": texts})


def build_streams(cfg: DataConfig, vocab_size: int, progress: bool = True) -> TokenStreams:
    """Tokenize and pack `cfg.source` (or reuse the cached result of an earlier run)."""
    tok_path = resolve_tokenizer(cfg, vocab_size)
    load_tokenizer(tok_path, vocab_size)  # refuses a vocabulary that does not match the model
    digest = file_digest(tok_path)
    docs = _materialize(load_documents(cfg), cfg)
    key = f"{docs._fingerprint}|{digest}|{cfg.val_fraction}|{cfg.seed}"
    out = (
        Path(os.path.expanduser(cfg.cache_dir))
        / "packed"
        / hashlib.sha1(key.encode()).hexdigest()[:16]
    )
    streams = _read_packed(out)
    if streams is None:
        _pack(docs, cfg, tok_path, digest, out, progress)
        streams = _read_packed(out)
    if streams is None:  # the build itself came out short: a bug or a failing disk
        raise DataError(f"data.cache_dir: the packed corpus {out} was written incomplete")
    return TokenStreams(streams["train"], streams["val"], tok_path, cfg.source)


def _read_packed(out: Path) -> dict[str, np.ndarray] | None:
    """The cached streams under `out`, or None (after removing it) if absent or incomplete."""
    if not out.exists():
        return None
    try:
        meta = json.loads((out / "meta.json").read_text())
        sizes = {s: int(meta[s]) for s in SPLITS}
        for s in SPLITS:  # a split of 0 tokens is a 1-token file (memmaps cannot be empty)
            have, want = (out / f"{s}.bin").stat().st_size, 4 * max(1, sizes[s])
            if have != want:
                raise ValueError(f"{s}.bin has {have} bytes, meta.json says {want}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        note(f"data: the packed corpus {out} is incomplete ({reason}); rebuilding it")
        shutil.rmtree(out, ignore_errors=True)
        return None
    return {
        s: np.memmap(out / f"{s}.bin", dtype=np.int32, mode="r", shape=(sizes[s],))
        if sizes[s]
        else np.zeros(0, np.int32)
        for s in SPLITS
    }


def _pack(docs, cfg: DataConfig, tok_path: str, digest: str, out: Path, progress: bool) -> None:
    if not progress:
        datasets.disable_progress_bars()
    tokenized = docs.map(
        _tokenize_batch,
        batched=True,
        batch_size=64,
        num_proc=cfg.num_proc if len(docs) >= 4 * cfg.num_proc else None,
        remove_columns=docs.column_names,
        fn_kwargs={"model_path": tok_path, "digest": digest},
        desc="tokenize",
    )
    is_val = split_documents(len(tokenized), cfg.val_fraction, cfg.seed)
    lengths = np.asarray(tokenized["n"], dtype=np.int64)
    sizes = {"train": int(lengths[~is_val].sum()), "val": int(lengths[is_val].sum())}
    # built beside `out` and renamed into place whole: a kill leaves only the temporary
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.*")  # KEY is hex: no glob characters
    tmp = out.parent / f".{out.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {
        s: np.memmap(tmp / f"{s}.bin", dtype=np.int32, mode="w+", shape=(max(1, sizes[s]),))
        for s in SPLITS
    }
    at = {s: 0 for s in SPLITS}
    row = 0
    for batch in tokenized.iter(batch_size=1024):
        for ids in batch["ids"]:
            s = "val" if is_val[row] else "train"
            files[s][at[s] : at[s] + len(ids)] = ids
            files[s][at[s] + len(ids)] = EOS_ID  # separator where documents meet
            at[s] += len(ids) + 1
            row += 1
    for s in SPLITS:
        files[s].flush()
    del files
    meta = {**sizes, "documents": row, "tokenizer": tok_path}
    (tmp / "meta.json").write_text(json.dumps(meta))
    for name in ("train.bin", "val.bin", "meta.json"):
        fsync_file(tmp / name)
    try:
        os.rename(tmp, out)
    except OSError:  # another process (a host on this machine) renamed its build first
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            raise
