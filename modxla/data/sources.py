"""Text sources, all as HF `datasets` with one document per row in a `text` column.

- `stdlib`: the Python standard library source of the running interpreter (always present).
- a local path, directory or glob: .txt/.py/.md (one document per file), .jsonl/.json, .parquet.
- anything else: a dataset name on the Hugging Face hub (optionally streamed).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import datasets
from datasets.arrow_writer import SchemaInferenceError

from modxla.config import DataConfig
from modxla.errors import UserError

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(UserError, ValueError):
    """Bad data input: a missing path, an empty corpus, undecodable bytes, a vocab mismatch."""


def stdlib_files() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts)


def is_local(source: str) -> bool:
    """Local files, unless it reads as a hub name such as `allenai/c4` or `wikitext`."""
    if source == "stdlib" or os.path.exists(os.path.expanduser(source)):
        return True
    if any(c in source for c in "*?[") or source.startswith(("/", ".", "~")):
        return True
    return Path(source).suffix.lower() in TEXT_SUFFIXES | set(TABLE_BUILDERS)


def local_files(source: str) -> list[str]:
    """Expand a path, directory or glob to its files, sorted; errors name the path."""
    if source == "stdlib":
        return stdlib_files()
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    elif any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data.source: no such file or directory: {source}")
    if not files:
        raise DataError(f"data.source: no files match {source}")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.source: {source} mixes file types {sorted(kinds)}; use one type")
    return files


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in TABLE_BUILDERS:
        return TABLE_BUILDERS[suffix]
    return "text"


def _read_documents(files: list[str], max_chars: int, strict: bool = True):
    """One document per file, UTF-8, stopping once `max_chars` are read (0 = all).

    strict: undecodable bytes are an error naming the file; otherwise the file is skipped
    (the standard library ships a few test files in legacy encodings on purpose).
    """
    total = 0
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            if not strict:
                continue
            raise DataError(f"{f}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if not text.strip():
            continue
        if max_chars and total + len(text) > max_chars:
            text = text[: max_chars - total]
        total += len(text)
        yield {"text": text}
        if max_chars and total >= max_chars:
            return


def load_documents(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The source as a dataset of documents with a `text` column (cached by `datasets`)."""
    cache = os.path.join(os.path.expanduser(cfg.cache_dir), "hf")
    if not is_local(cfg.source):
        ds = datasets.load_dataset(
            cfg.source,
            cfg.hub_config or None,
            split=cfg.split,
            streaming=cfg.streaming,
            cache_dir=cache,
        )
        return _select_text(ds, cfg)
    files = local_files(cfg.source)
    kind = _kind(files[0])
    if kind == "text":
        gen_kwargs = {
            "files": tuple(files),
            "max_chars": cfg.max_chars,
            "strict": cfg.source != "stdlib",
        }
        try:
            ds = datasets.Dataset.from_generator(
                _read_documents,
                gen_kwargs=gen_kwargs,
                cache_dir=cache,
                # keyed by names, sizes and mtimes: an edited file is read again
                fingerprint=_files_signature(files, cfg.max_chars),
            )
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, DataError):
                raise e.__cause__ from None
            if isinstance(e.__cause__, SchemaInferenceError):
                raise DataError(f"data.source: {cfg.source} holds no text (empty corpus)") from None
            raise
    else:
        ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache)
        ds = _select_text(ds, cfg)
        if cfg.max_chars:
            ds = _truncate(ds, cfg.max_chars)
    if len(ds) == 0:
        raise DataError(f"data.source: {cfg.source} holds no text (empty corpus)")
    return ds


def _select_text(ds, cfg: DataConfig):
    cols = ds.column_names or []
    if cols and cfg.text_field not in cols:
        raise DataError(
            f"data.text_field: {cfg.source} has no column {cfg.text_field!r} (columns: {cols})"
        )
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds.select_columns(["text"]) if cols else ds


def _truncate(ds: datasets.Dataset, max_chars: int) -> datasets.Dataset:
    total, n = 0, 0
    for n, text in enumerate(ds["text"], 1):  # noqa: B007
        total += len(text)
        if total >= max_chars:
            break
    return ds.select(range(n))


def _files_signature(files: list[str], max_chars: int) -> str:
    import hashlib

    h = hashlib.sha1(str(max_chars).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def source_signature(cfg: DataConfig) -> dict:
    """What identifies the text a source yields, for cache keys that must follow the corpus.

    Local sources: the files' absolute names, sizes and mtimes (so an edited, added or removed
    file changes it) and `text_field`; hub sources: the name, config, split and `text_field`
    (no revision is configurable: a hub dataset is read as `datasets` resolves it).
    """
    sig: dict = {"source": cfg.source, "text_field": cfg.text_field}
    if is_local(cfg.source):
        files = [os.path.abspath(f) for f in local_files(cfg.source)]
        sig.update(kind=_kind(files[0]), files=_files_signature(files, 0))
    else:
        sig.update(hub_config=cfg.hub_config, split=cfg.split)
    return sig


def iter_text(ds, max_chars: int = 0):
    """Document texts of a dataset (map-style or streaming), up to `max_chars` in total."""
    total = 0
    for row in ds:
        text = row["text"]
        if max_chars and total + len(text) > max_chars:
            yield text[: max_chars - total]
            return
        total += len(text)
        yield text
