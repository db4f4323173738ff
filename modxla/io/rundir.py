"""The run directory: its file names, and all of its I/O, for a local path or any fsspec URL.

A run directory is a string, never a `pathlib.Path`: `Path("gs://b/r")` is the local path
`gs:/b/r`. Every read and write goes through fsspec, so `runs/x`, `gs://bucket/runs/x` and
`memory://x` behave alike.

Object stores cannot append, and gcsfs's rename is copy + delete; a single-object upload is
atomic. So files that grow (metrics.jsonl, TensorBoard events) are staged in a local folder and
uploaded whole at every checkpoint and at exit (see `Staging`): a crash loses at most what was
logged after the last checkpoint, which a resumed run logs again. Local run directories are
written in place (append + flush), so they lose nothing.

Every operation goes through `retry.retrying` (one policy for transient store errors), and
each is idempotent: a retried upload leaves the same whole object.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import fsspec
import yaml

from modxla.config import Config, ConfigError, from_dict, to_dict
from modxla.io.retry import MissingError, install, retrying

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TB = "tb"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.model"
PREDICTOR = "predictor"
LOGS = "logs"
EVAL = "eval.json"
CALIBRATION = "calibration.json"  # <run>/predictor/: causal routing thresholds


def is_url(path: str) -> bool:
    """True for `scheme://...` except file://, which is local."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str, *names: str) -> str:
    """`base/name/...` for a path or a URL (no pathlib: it would collapse `gs://`)."""
    out = str(base).rstrip("/") or "/"
    for name in names:
        out = out.rstrip("/") + "/" + name.strip("/")
    return out


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def fs_of(path: str):
    """(filesystem, path inside it) for a local path or URL."""
    fs, p = fsspec.core.url_to_fs(str(path))
    install(fs)  # gcsfs's own per-request retries follow modxla's policy
    return fs, p


def exists(path: str) -> bool:
    fs, p = fs_of(path)
    return retrying(fs.exists, p, what=f"look up {path}")


def isfile(path: str) -> bool:
    fs, p = fs_of(path)
    return retrying(fs.isfile, p, what=f"look up {path}")


def _must_exist(fn, path: str, what: str):
    """`retrying(fn)` for an object that must exist: a missing one is one clear error."""
    try:
        return retrying(fn, what=f"{what} {path}")
    except FileNotFoundError:
        raise MissingError(f"{path} does not exist") from None


def makedirs(path: str) -> None:
    """Create a local folder; object stores have no folders to create."""
    if not is_url(path):
        os.makedirs(path.removeprefix("file://"), exist_ok=True)


def read_text(path: str) -> str:
    fs, p = fs_of(path)
    return _must_exist(lambda: fs.cat_file(p), path, "read").decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file so that readers see the old or the new content, never a part.

    Locally: a temporary file renamed over the target. On an object store a single upload
    is already atomic.
    """
    if is_url(path):
        fs, p = fs_of(path)
        retrying(fs.pipe_file, p, data, what=f"write {path}")  # one whole object
        return
    local = path.removeprefix("file://")
    folder = os.path.dirname(local) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, local)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def put_file(local: str, path: str) -> None:
    """Upload (or copy) a local file to `path`, whole."""
    if is_url(path):
        fs, p = fs_of(path)
        retrying(fs.put_file, local, p, what=f"upload {path}")  # whole, again if retried
    else:
        with open(local, "rb") as f:
            write_bytes(path, f.read())


def local_copy(path: str, suffix: str = "") -> str:
    """A local file with the content of `path` (itself when local): for readers such as
    sentencepiece that need a file name."""
    if not is_url(path):
        return path.removeprefix("file://")
    fs, p = fs_of(path)
    fd, tmp = tempfile.mkstemp(prefix="modxla-", suffix=suffix or "-" + basename(path))
    os.close(fd)
    _must_exist(lambda: fs.get_file(p, tmp), path, "download")
    return tmp


def read_jsonl(path: str) -> list[dict]:
    import json

    if not exists(path):
        return []
    return [json.loads(x) for x in read_text(path).splitlines() if x.strip()]


def save_config(cfg: Config, run_dir: str) -> None:
    write_text(join(run_dir, CONFIG), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(run_dir: str) -> Config:
    path = join(run_dir, CONFIG)
    if not exists(path):
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG})")
    return from_dict(yaml.safe_load(read_text(path)) or {})


def checkpoints(run_dir: str, cfg: Config | None = None) -> str:
    """Where the run's checkpoints live: checkpoint.dir if set, else <run>/checkpoints."""
    return (cfg.checkpoint.dir if cfg is not None else "") or join(run_dir, CHECKPOINTS)


class Staging:
    """metrics.jsonl and tb/ of one run directory, as local files the logger can append to.

    Local run directory: the files themselves. URL: a temporary folder whose files `sync()`
    uploads whole (metrics.jsonl as one object, each TensorBoard events file as one object).
    """

    def __init__(self, run_dir: str, keep_until: int) -> None:
        """Records with step > `keep_until` are dropped: a resumed run logs them again."""
        self.run_dir = str(run_dir)
        self.remote = is_url(self.run_dir)
        if self.remote:
            self.root = tempfile.mkdtemp(prefix="modxla-stage-")
        else:
            self.root = self.run_dir.removeprefix("file://")
            os.makedirs(self.root, exist_ok=True)
        self.metrics = os.path.join(self.root, METRICS)
        self.tb = os.path.join(self.root, TB)
        kept = _kept_lines(join(self.run_dir, METRICS), keep_until)
        tmp = self.metrics + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics)

    def sync(self) -> None:
        """Upload the staged files whole (a no-op for a local run directory)."""
        if not self.remote:
            return
        put_file(self.metrics, join(self.run_dir, METRICS))
        for dirpath, _, files in os.walk(self.tb):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), self.tb)
                put_file(os.path.join(dirpath, name), join(self.run_dir, TB, rel))

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.root, ignore_errors=True)


def _kept_lines(path: str, keep_until: int) -> list[str]:
    import json

    if keep_until <= 0 or not exists(path):
        return []
    return [
        line
        for line in read_text(path).splitlines()
        if line.strip() and json.loads(line)["step"] <= keep_until
    ]
