"""Text sources, all as HF `datasets` with one document per row in a `text` column.

- `stdlib`: the Python standard library source of the running interpreter (always present).
- a local path, directory or glob: .txt/.py/.md (one document per file), .jsonl/.json, .parquet.
- an object-store URL (`gs://bucket/corpus/*.jsonl`, a prefix, one object): the same file
  types, copied into the local cache first (`fetch_objects`) and then read as local files.
- anything else: a dataset name on the Hugging Face hub (optionally streamed).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import datasets
import fsspec
from datasets.arrow_writer import SchemaInferenceError
from tqdm import tqdm

from modxla.config import DataConfig
from modxla.errors import UserError
from modxla.io.retry import StoreError, install, retrying

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(UserError, ValueError):
    """Bad data input: a missing path, an empty corpus, undecodable bytes, a vocab mismatch."""


def stdlib_files() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts)


def note(msg: str) -> None:
    """A status line on stderr, as `io.logger.say` writes them (data may not import io)."""
    tqdm.write(f"[modxla] {msg}", file=sys.stderr)


def is_url(source: str) -> bool:
    """An object-store URL (`gs://`, `s3://`, `memory://`); file:// is a local path."""
    return "://" in source and not source.startswith("file://")


def is_local(source: str) -> bool:
    """Local files, unless it reads as a hub name such as `allenai/c4` or `wikitext`."""
    if is_url(source):
        return False
    source = source.removeprefix("file://")
    if source == "stdlib" or os.path.exists(os.path.expanduser(source)):
        return True
    if any(c in source for c in "*?[") or source.startswith(("/", ".", "~")):
        return True
    return Path(source).suffix.lower() in TEXT_SUFFIXES | set(TABLE_BUILDERS)


def local_files(source: str) -> list[str]:
    """Expand a path, directory or glob to its files, sorted; errors name the path."""
    if source == "stdlib":
        return stdlib_files()
    path = os.path.expanduser(source.removeprefix("file://"))
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
    _one_kind(source, files)
    return files


def _one_kind(source: str, names: list[str]) -> str:
    kinds = {_kind(f) for f in names}
    if len(kinds) > 1:
        raise DataError(f"data.source: {source} mixes file types {sorted(kinds)}; use one type")
    return kinds.pop()


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in TABLE_BUILDERS:
        return TABLE_BUILDERS[suffix]
    return "text"


# --- object stores ------------------------------------------------------------------------
# The objects are copied into the local cache (keyed by their signature) before anything reads
# them, rather than handing the URLs to `datasets`: (1) the signature and the bytes read come
# from one listing, and each copy is checked against that listing's size and md5, so a cache
# key never names other bytes; (2) every store call goes through `store_call`, the one place a
# retry policy for transient errors needs wrapping, where `datasets` would read with its own;
# (3) text objects (one document each) and tables then take the tested local-file path; (4)
# a copy is renamed into place whole, so a kill mid-download leaves no file that looks done.
# The packed corpus is stored locally anyway, so the copy costs no more disk than it needs.

VERSION_KEYS = ("generation", "md5Hash", "crc32c", "etag", "ETag", "VersionId", "updated",
                "LastModified", "mtime", "created")  # fmt: skip


def store_call(what: str, fn, *args, **kwargs):
    """Call `fn` (one object-store request of the corpus: listing, metadata or download).

    The single entry for store I/O: transient errors are retried by the run directory's
    policy (`io.retry`); a missing object or a refused read is a DataError naming `what`.
    """
    try:
        return retrying(fn, *args, what=what, **kwargs)
    except FileNotFoundError:
        raise DataError(f"data.source: no such object: {what}") from None
    except (PermissionError, StoreError) as e:
        raise DataError(f"data.source: access to {what} refused: {e}") from None


def list_objects(source: str) -> tuple[fsspec.AbstractFileSystem, list[dict]]:
    """(filesystem, info of every object `source` names: a glob, a prefix or one object)."""
    fs, path = fsspec.core.url_to_fs(source)
    install(fs)  # gcsfs's own per-request retries follow the same policy
    fs.invalidate_cache()  # gcsfs keeps listings per process: an edited object must show
    if any(c in path for c in "*?["):
        infos = list(store_call(source, fs.glob, path, detail=True).values())
    else:
        info = store_call(source, fs.info, path)
        if info["type"] == "directory":
            infos = list(store_call(source, fs.find, path, detail=True).values())
        else:
            infos = [info]
    infos = sorted((i for i in infos if i["type"] == "file"), key=lambda i: i["name"])
    if not infos:
        raise DataError(f"data.source: no objects match {source}")
    _one_kind(source, [i["name"] for i in infos])
    return fs, infos


def _objects_signature(fs, infos: list[dict]) -> str:
    """Names, sizes and versions (generation, checksums, update time: what the store gives)."""
    h = hashlib.sha1()
    for i in infos:
        version = [f"{k}={i[k]}" for k in VERSION_KEYS if i.get(k) is not None]
        h.update(f"{fs.unstrip_protocol(i['name'])}\0{i['size']}\0{version}\0".encode())
    return h.hexdigest()[:16]


def _md5_b64(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode()


def fsync_file(path: str | Path) -> None:
    """Flush a file to disk before it is renamed into place (a crash then finds it whole)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_stale(folder: Path, pattern: str) -> None:
    """Remove temporaries `pattern` (ending `.PID` or `.PID.part`) of processes now dead."""
    for tmp in folder.glob(pattern):
        pid = tmp.name.removesuffix(".part").rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def fetch_objects(source: str, cache_dir: str) -> list[str]:
    """Local copies of the objects `source` names, under <cache>/objects/<signature>/."""
    fs, infos = list_objects(source)
    root = Path(os.path.expanduser(cache_dir)) / "objects" / _objects_signature(fs, infos)
    files = []
    for info in infos:
        local = root / info["name"].lstrip("/")
        if not (local.is_file() and local.stat().st_size == info["size"]):
            if local.exists():  # only damage does this: copies are renamed into place whole
                url = fs.unstrip_protocol(info["name"])
                note(f"data: the cached copy of {url} is damaged; downloading it again")
            _download(fs, info, local)
        files.append(str(local))
    return files


def _download(fs, info: dict, local: Path) -> None:
    url = fs.unstrip_protocol(info["name"])
    local.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(local.parent, f".{glob.escape(local.name)}.*.part")
    tmp = local.parent / f".{local.name}.{os.getpid()}.part"
    try:
        store_call(url, fs.get_file, info["name"], str(tmp))
        size, md5 = tmp.stat().st_size, info.get("md5Hash")
        if size != info["size"] or (md5 and _md5_b64(tmp) != md5):
            raise DataError(
                f"data.source: {url} changed while it was read (got {size} bytes, listed "
                f"{info['size']}); run again"
            )
        fsync_file(tmp)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


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
    if not is_url(cfg.source) and not is_local(cfg.source):
        ds = datasets.load_dataset(
            cfg.source,
            cfg.hub_config or None,
            split=cfg.split,
            streaming=cfg.streaming,
            cache_dir=cache,
        )
        return _select_text(ds, cfg)
    if is_url(cfg.source):
        files = fetch_objects(cfg.source, cfg.cache_dir)
    else:
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
    h = hashlib.sha1(str(max_chars).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def source_signature(cfg: DataConfig) -> dict:
    """What identifies the text a source yields, for cache keys that must follow the corpus.

    Local sources: the files' absolute names, sizes and mtimes (so an edited, added or removed
    file changes it) and `text_field`; URLs: the objects' names, sizes and versions from the
    store's metadata; hub sources: the name, config, split and `text_field` (no revision is
    configurable: a hub dataset is read as `datasets` resolves it).
    """
    sig: dict = {"source": cfg.source, "text_field": cfg.text_field}
    if is_url(cfg.source):
        fs, infos = list_objects(cfg.source)
        sig.update(kind=_kind(infos[0]["name"]), objects=_objects_signature(fs, infos))
    elif is_local(cfg.source):
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
