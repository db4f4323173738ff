"""Distributed checkpoints (torch.distributed.checkpoint), local or any fsspec URL (gs://...).

Layout: `<dir>/step_00000100/` holds the DCP files and, written last, `COMPLETE` (JSON) with
the size and CRC-32 of every file. A folder without it was cut short (kill -9, preemption
mid-write) and is never loaded; a file whose size or checksum differs from the marker's (a
shard damaged in place) makes the folder incomplete too, and resuming falls back to the newest
good checkpoint.

A save never deletes a complete checkpoint: a step already complete is not written again. On
a local disk a new one is written into `step_N.partial/`, marker included, and renamed into
place (one atomic rename). Object stores have no rename (gcsfs `mv` is copy + delete, twice
the bytes of every shard), so there the files go straight to `step_N/`, the marker last: the
marker is what makes a folder real.

Saving: each XLA tensor is copied to the host as its unique local shards (`_CpuShards`) and
written with torch_xla's SPMDSavePlanner. torch_xla 2.9 silently drops a tensor that is sharded
on one mesh axis and replicated on another when it is handed over as a sharded XLA tensor;
deduplicating the shards here first avoids that (tests check every tensor of a 2-D mesh).

Checksums are computed as the files are written: the storage writer's output streams update a
CRC-32 as the bytes pass (`_CrcStream` in `_writer`), so a save never reads its shards back.
Each host sees only the files it wrote; the hosts' {file: (crc, size)} are gathered to process
0 with one `all_gather_object` on the default group (DCP's save has just run its collectives
on it), and the marker is assembled from them. A file with no recorded checksum (a stream
that seeked back, hosts saving without a process group) is read back once, as before.

Loading: tensors are read as whole CPU tensors and then placed and sharded like a fresh run,
so a checkpoint restores onto any mesh shape (resharding for free; one host copy per tensor).
Checksums are verified as the files are read, not by a read before: the reader's streams
serve DCP's per-tensor slices in file order and update a CRC-32 as the bytes pass, reading
the bytes between and after them only for the CRC (`_CrcReadStream`), so each file is read
once. `load_newest` loads the newest checkpoint and, when a file fails its checksum, falls
back to an older one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.api import CheckpointException

from modxla.errors import EXIT_DISK_FULL, UserError
from modxla.io.retry import install, retrying

# Single-process saves are intended; these warnings would print on every checkpoint.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional")
warnings.filterwarnings("ignore", message="The function definition for SavePlanner.set_up_planner")

MARKER = "COMPLETE"
PREFIX = "step_"
PARTIAL = ".partial"  # suffix of the folder a save writes before it is moved into place
CHUNK = 16 << 20  # bytes per read when checksumming: streams multi-GB shards


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete everywhere, or does not fit the model."""


class DamagedCheckpoint(CheckpointError):
    """A file of a checkpoint failed its checksum as it was read (bit rot, a bad copy)."""


class DiskFullError(CheckpointError):
    """A save ran out of space: its partial files are removed, the checkpoints before it are
    intact (exit 4: a launcher must not restart it into the same full disk)."""

    exit_code = EXIT_DISK_FULL


def _no_space(e: BaseException) -> bool:
    """ENOSPC, raised here or by a DCP writer thread (wrapped in a CheckpointException)."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    failures = getattr(e, "failures", None) or {}
    return any(_no_space(exc) for exc, _ in failures.values())


def _fs(path: str):
    fs, root = fsspec.core.url_to_fs(path)
    install(fs)  # gcsfs's own per-request retries follow modxla's policy
    return fs, root


def _remove(fs, root: str) -> None:
    """Delete a folder and everything in it; one already gone (a delete that took effect
    before its reply was lost) is done."""
    try:
        retrying(fs.rm, root, recursive=True, what=f"delete {root}")
    except FileNotFoundError:
        pass


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def step_dir(base: str, step: int) -> str:
    return _join(base, f"{PREFIX}{step:08d}")


def list_checkpoints(base: str, warn=print, verify: bool = False) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first; incomplete ones are reported.

    Sizes are always checked against the marker; `verify` also re-reads every file to
    compare checksums (about 3 GB/s of CRC-32 on one core, so reading is the cost).
    """
    fs, root = _fs(base)
    if not fs.exists(root):
        return []
    out = []
    for entry in sorted(fs.ls(root, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
            continue
        path = _join(base, name)
        problem = _incomplete(fs, entry, verify)
        if problem:
            warn(f"checkpoint {path} is incomplete ({problem}); skipping it")
        else:
            out.append((int(name[len(PREFIX) :]), path))
    return sorted(out)


def _manifest(fs, root: str) -> dict[str, int]:
    files = fs.ls(root, detail=True)
    return {f["name"].rstrip("/").rsplit("/", 1)[-1]: int(f["size"]) for f in files}


def _crc32(fs, path: str) -> str:
    """CRC-32 of a file, read in chunks (zlib: stdlib, no extra dependency)."""
    crc = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _checksums(fs, root: str, names) -> dict[str, str]:
    return {name: _crc32(fs, _join(root, name)) for name in names}


def _incomplete(fs, root: str, verify: bool = False) -> str | None:
    """Why a checkpoint folder cannot be loaded, or None if every file it wrote is intact."""
    marker = _join(root, MARKER)
    if not fs.exists(marker):
        return f"no {MARKER} marker"
    try:
        with fs.open(marker, "r") as f:
            info = json.load(f)
        expected, sums = info.get("files", {}), info.get("crc32", {})
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
        return f"{MARKER} marker unreadable"
    present = _manifest(fs, root)
    for name, size in expected.items():
        if present.get(name) != size:
            return f"{name} is missing or truncated"
    if verify:
        for name, crc in sums.items():  # markers older than checksums have none
            if _crc32(fs, _join(root, name)) != crc:
                return f"{name} fails its checksum (damaged after it was written)"
    return None


def read_marker(path: str) -> dict:
    """A complete checkpoint's COMPLETE marker: step, files, checksums and what its writer
    added (the trainer: the run's config)."""
    fs, root = _fs(path)
    with fs.open(_join(root, MARKER), "r") as f:
        return json.load(f)


def checkpoint_id(path: str) -> dict:
    """{"step", "digest"}: which checkpoint this is, by content (a hash of its checksums)."""
    info = read_marker(path)
    sums = json.dumps(info.get("crc32") or info.get("files"), sort_keys=True)
    return {"step": int(info["step"]), "digest": hashlib.sha256(sums.encode()).hexdigest()[:16]}


def latest_checkpoint(base: str, warn=print, verify: bool = True) -> str | None:
    """The newest checkpoint whose files are all intact (checksums verified), or None."""
    fs, _ = _fs(base)
    for _, path in reversed(list_checkpoints(base, warn)):
        problem = _incomplete(fs, _fs(path)[1], verify)
        if not problem:
            return path
        warn(f"checkpoint {path} is incomplete ({problem}); falling back to an older one")
    return None


def is_complete(path: str, verify: bool = True) -> bool:
    fs, root = _fs(path)
    return fs.exists(root) and _incomplete(fs, root, verify) is None


def _host_view(t: torch.Tensor):
    """A host copy of a tensor for saving: unique local shards if sharded, else the tensor."""
    if t.device.type != "xla":
        return t.detach().cpu()
    import torch_xla.distributed.spmd as xs
    from torch_xla.experimental.distributed_checkpoint._helpers import _CpuShards

    st = xs.wrap_if_sharded(t)
    if not isinstance(st, xs.XLAShardedTensor):
        return t.detach().cpu()
    unique = {}
    for shard in st.local_shards:
        if shard.indices is Ellipsis:  # replicated over this host's devices
            return t.detach().cpu()
        unique.setdefault(tuple((i.start, i.stop) for i in shard.indices), shard)
    return _CpuShards(shards=list(unique.values()), global_shape=t.shape)


def _to_host(obj):
    if isinstance(obj, torch.Tensor):
        return _host_view(obj)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class _CrcStream:
    """A write stream that updates a CRC-32 with every byte written through it."""

    def __init__(self, stream, landed=None) -> None:
        self._stream = stream
        self._landed = landed  # (size) -> bool: is the object in the store, whole?
        self.crc = 0
        self.size = 0
        self.sequential = True  # False once it seeks anywhere but the end: crc is unusable

    def write(self, data) -> int:
        n = self._stream.write(data)
        view = memoryview(data).cast("B")
        if n is not None and n != view.nbytes:
            self.sequential = False  # a short write: the CRC no longer matches the file
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return n

    def seek(self, offset, whence=0):
        pos = self._stream.seek(offset, whence)
        if pos != self.size:
            self.sequential = False
        return pos

    def close(self) -> None:
        """Close (upload); a lost last reply whose upload landed whole is no error. GCS
        answers a resent final chunk 200, the emulator 404, which gcsfs raises."""
        try:
            self._stream.close()
        except FileNotFoundError:
            if not (self.sequential and self._landed and self._landed(self.size)):
                raise

    def __getattr__(self, name):  # tell, flush, fileno (fsync), ...
        return getattr(self._stream, name)


class _CrcFileSystem:
    """DCP's FileSystem (local or fsspec) whose write streams record {file name: (crc, size)}."""

    def __init__(self, fs, sums: dict) -> None:
        self._fs = fs
        self._sums = sums

    @contextmanager
    def create_stream(self, path, mode: str):
        if not any(ch in mode for ch in "wa+"):
            with self._fs.create_stream(path, mode) as stream:
                yield stream
            return
        name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
        self._sums.pop(name, None)
        with self._fs.create_stream(path, mode) as stream:
            crc = _CrcStream(stream, landed=lambda size: self._landed(path, size))
            yield crc
            crc.close()  # here, not in create_stream's exit: a landed upload is no error
        if crc.sequential and "a" not in mode and "+" not in mode:
            self._sums[name] = (f"{crc.crc:08x}", crc.size)

    def _landed(self, path, size: int) -> bool:
        fs = getattr(self._fs, "fs", None)
        if fs is None or _is_local(fs):
            return False
        fs.invalidate_cache()
        return retrying(lambda: fs.exists(path) and fs.size(path) == size, what=f"look up {path}")

    def rename(self, path, new_path) -> None:  # .metadata.tmp -> .metadata
        old = os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
        new = os.fspath(new_path).rstrip("/").rsplit("/", 1)[-1]
        fs = getattr(self._fs, "fs", None)  # fsspec's (FsspecWriter); the local writer's: none
        if fs is None or _is_local(fs):
            self._fs.rename(path, new_path)
        else:
            size = self._sums[old][1] if old in self._sums else fs.size(path)
            retrying(self._idempotent_rename, fs, path, new_path, size, what=f"rename {path}")
        if old in self._sums:
            self._sums[new] = self._sums.pop(old)

    def _idempotent_rename(self, fs, path, new_path, size: int) -> None:
        """On an object store a rename is a copy and a delete (or a move): when a reply is
        lost after the store did it, the retry finds the source gone (404). Gone with the
        target there at the right size means done; anything else is still an error."""
        try:
            self._fs.rename(path, new_path)
        except FileNotFoundError:
            fs.invalidate_cache()
            if fs.exists(path) or not fs.exists(new_path) or fs.size(new_path) != size:
                raise

    def __getattr__(self, name):
        return getattr(self._fs, name)


def _writer(path: str):
    """DCP's writer for `path`, with `.crc32`: {file name: (crc, size)} of what it wrote."""
    # per_thread_copy_ahead=0: the tensors are on the host already. With the default, DCP
    # picks its GPU-stream loader as soon as jax/torchax is installed (torch_xla's
    # mark_sharding imports torchax, whose privateuse1 device says "available") and fails.
    if "://" in path:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(path, per_thread_copy_ahead=0)
    else:
        writer = dcp.FileSystemWriter(path, per_thread_copy_ahead=0)
    writer.crc32 = {}
    writer.fs = _CrcFileSystem(writer.fs, writer.crc32)
    return writer


def _gather_crcs(sums: dict) -> dict:
    """Every host's {file: (crc, size)}, merged (one collective when a group is initialized)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(sums)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, dict(sums))
    merged = {}
    for part in every:
        merged.update(part or {})
    return merged


class _CrcReadStream:
    """A read stream that computes its file's CRC-32 in one forward pass. DCP reads a file
    as one slice per tensor (`item`): each is read whole into memory, in file order, and the
    bytes between the slices and after the last are read only for the CRC. A slice before
    one already read (or a seek elsewhere) makes the CRC unusable: the file is then read
    again for its checksum."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.crc = 0
        self.pos = 0  # bytes of the file read in order so far
        self.sequential = True

    def _take(self, n: int) -> bytes:
        data = self._stream.read(n)  # one piece: io.BytesIO shares bytes without a copy
        while len(data) < n and (more := self._stream.read(n - len(data))):
            data += more  # a short read (an object store's block), rare
        self.crc = zlib.crc32(data, self.crc)
        self.pos += len(data)
        return data

    def item(self, offset: int, length: int) -> io.BytesIO:
        if self.sequential and offset >= self.pos:
            while self.pos < offset and self._take(min(offset - self.pos, CHUNK)):
                pass
            return io.BytesIO(self._take(length))
        self.sequential = False
        self._stream.seek(offset)
        return io.BytesIO(self._stream.read(length))

    def read(self, n: int = -1) -> bytes:  # `.metadata`: pickle reads it in order
        data = self._stream.read(n)
        if self.sequential:
            self.crc = zlib.crc32(data, self.crc)
            self.pos += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self._stream.readline(limit)
        if self.sequential:
            self.crc = zlib.crc32(data, self.crc)
            self.pos += len(data)
        return data

    def seek(self, offset, whence=0):
        pos = self._stream.seek(offset, whence)
        if pos != self.pos:
            self.sequential = False
        return pos

    def finish(self) -> tuple[str, int] | None:
        """(crc, size) of the whole file, reading what was not read yet; None: unknown."""
        if not self.sequential:
            return None
        while self._take(CHUNK):
            pass
        return f"{self.crc:08x}", self.pos

    def __getattr__(self, name):  # tell, readable, seekable, ...
        return getattr(self._stream, name)


class _CrcReadFileSystem:
    """DCP's FileSystem whose read streams record {file name: (crc, size) or None}."""

    def __init__(self, fs, sums: dict) -> None:
        self._fs = fs
        self._sums = sums

    @contextmanager
    def create_stream(self, path, mode: str):
        with self._fs.create_stream(path, mode) as stream:
            if mode != "rb":
                yield stream
                return
            crc = _CrcReadStream(stream)
            name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
            self._sums[name] = None  # read, CRC unknown: stays so if the read fails
            yield crc
            self._sums[name] = crc.finish()

    def __getattr__(self, name):
        return getattr(self._fs, name)


class _CrcSlices:
    """DCP reader whose per-tensor slices come from `_CrcReadStream.item`, requested in file
    order (DCP's own order follows the state dict, not the file)."""

    def read_data(self, plan, planner):
        def where(item):
            info = self.storage_data[item.storage_index]
            return info.relative_path, info.offset

        return super().read_data(replace(plan, items=sorted(plan.items, key=where)), planner)

    def _slice_file(self, file, sinfo):
        if isinstance(file, _CrcReadStream):
            return file.item(sinfo.offset, sinfo.length)
        return super()._slice_file(file, sinfo)


class _CrcFileSystemReader(_CrcSlices, dcp.FileSystemReader):
    pass


class _CrcFsspecReader(_CrcSlices, FsspecReader):
    pass


def _reader(path: str, verify: bool = False):
    """DCP's reader for `path`; `verify`: with `.crc32`, {file: (crc, size) or None} of what
    it read."""
    url = "://" in path
    if not verify:
        return FsspecReader(path) if url else dcp.FileSystemReader(path)
    reader = _CrcFsspecReader(path) if url else _CrcFileSystemReader(path)
    reader.crc32 = {}
    reader.fs = _CrcReadFileSystem(reader.fs, reader.crc32)
    return reader


def _damaged(fs, root: str, read: dict) -> str | None:
    """The first file read whose checksum differs from the marker's, or None. Files DCP did
    not read gave nothing to the state; files read out of order are read again here."""
    with fs.open(_join(root, MARKER), "r") as f:
        expected = json.load(f).get("crc32", {})
    for name, crc in expected.items():
        if name not in read:
            continue
        got = read[name][0] if read[name] else _crc32(fs, _join(root, name))
        if got != crc:
            return f"{name} fails its checksum (damaged after it was written)"
    return None


@dataclass
class Checkpointer:
    """Saves every N steps (optionally in a background thread), keeps the newest K."""

    base: str
    keep: int = 3
    async_save: bool = False
    is_main: bool = True
    crc_on_write: bool = True  # False: the old path, every file read back for its CRC (bench)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(1) if self.async_save else None
        self._pending: Future | None = None

    def save(self, step: int, state: dict, extra: dict | None = None) -> str | None:
        """Write `state` (nested dicts of tensors and plain values) as step `step`.

        Returns the path, or None when step `step` is already complete (never rewritten:
        deleting it first would lose the run to a kill in between).
        """
        self.wait()
        path = step_dir(self.base, step)
        if is_complete(path):
            return None
        partial = path + PARTIAL
        fs, root = _fs(partial)
        if self.is_main and retrying(fs.exists, root, what=f"look up {partial}"):
            _remove(fs, root)  # a leftover of an interrupted save of this step
        host = _to_host(state)  # device -> host now; the write may go on in the background
        if self._pool is None:
            self._write(path, step, host, extra or {})
        else:
            self._pending = self._pool.submit(self._write, path, step, host, extra or {})
        return path

    def _write(self, path: str, step: int, host: dict, extra: dict) -> None:

        fs, root = _fs(path)
        local = _is_local(fs)
        if not local and self.is_main and retrying(fs.exists, root, what=f"look up {path}"):
            _remove(fs, root)  # incomplete or damaged: a complete one is skipped
        target = path + PARTIAL if local else path
        try:
            self._write_files(fs, path, target, local, step, host, extra)
        except (OSError, CheckpointException) as e:  # CheckpointException: a BaseException
            if not _no_space(e):
                raise
            if self.is_main and fs.exists(_fs(target)[1]):
                fs.rm(_fs(target)[1], recursive=True)  # never a half checkpoint in place
            raise DiskFullError(
                f"no space left on the device writing checkpoint step {step} to {path}: its "
                "partial files were removed and the checkpoints before it are intact; free "
                "space and run again (it resumes from the newest one)"
            ) from None

    def _write_files(self, fs, path, target, local, step, host, extra) -> None:
        from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

        root = _fs(path)[1]
        writer = _writer(target)
        dcp.save(host, storage_writer=writer, planner=SPMDSavePlanner())
        written = _gather_crcs(writer.crc32) if self.crc_on_write else {}
        if not self.is_main:
            return
        tmp_root = _fs(target)[1]
        fs.invalidate_cache(tmp_root)  # list what the store holds, not what gcsfs recalls
        files = retrying(_manifest, fs, tmp_root, what=f"list {target}")
        # computed as written; any file without one (or of another size) is read back
        sums = {n: written[n][0] for n in files if written.get(n, (None, -1))[1] == files[n]}
        unsummed = [n for n in files if n not in sums]
        sums.update(retrying(_checksums, fs, tmp_root, unsummed, what=f"read back {target}"))
        info = {
            "step": step,
            "time": time.time(),
            "files": files,
            "crc32": dict(sorted(sums.items())),
            **extra,
        }
        if local:  # marker inside the partial folder, then one atomic rename
            with fs.open(_join(tmp_root, MARKER), "w") as f:
                json.dump(info, f)
            if fs.exists(root):  # incomplete or damaged: a complete one is skipped
                fs.rm(root, recursive=True)
            os.rename(tmp_root, root)
        else:  # one object written whole, after every shard (a retry rewrites the same one)
            marker = _join(root, MARKER)
            retrying(fs.pipe_file, marker, json.dumps(info).encode(), what=f"write {marker}")
        self._prune()

    def wait(self) -> None:
        """Block until a background save has finished (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _prune(self) -> None:
        quiet = lambda _: None  # noqa: E731
        found = retrying(list_checkpoints, self.base, quiet, what=f"list {self.base}")
        fs, _ = _fs(self.base)
        for _, path in found[: -self.keep]:
            _remove(fs, _fs(path)[1])

    def clear(self) -> None:
        """Delete every checkpoint here (complete or not): an explicit fresh start."""
        self.wait()
        fs, root = _fs(self.base)
        if retrying(fs.exists, root, what=f"look up {self.base}"):
            _remove(fs, root)

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


def read_metadata(path: str) -> dict[str, torch.Size]:
    """Global shape of every tensor in a checkpoint, by flattened key."""
    md = _reader(path).read_metadata()
    return {k: m.size for k, m in md.state_dict_metadata.items() if hasattr(m, "size")}


def load(path: str, template: dict, verify: bool = True) -> dict:
    """Fill `template` (nested dicts of CPU tensors and plain values) from a checkpoint.

    `verify`: every file read is checked against its checksum as it is read (each file read
    once); a mismatch raises DamagedCheckpoint and `template` must not be used.
    """
    fs, root = _fs(path)
    if not fs.exists(root):
        raise CheckpointError(f"checkpoint {path} does not exist")
    problem = _incomplete(fs, root)
    if problem:
        raise CheckpointError(f"checkpoint {path} is incomplete ({problem})")
    reader = _reader(path, verify)
    try:
        dcp.load(template, storage_reader=reader)
    except (Exception, CheckpointException):  # damaged bytes can break unpickling first
        if verify and (problem := _damaged(fs, root, dict.fromkeys(reader.crc32))):
            raise DamagedCheckpoint(f"checkpoint {path} is incomplete ({problem})") from None
        raise
    if verify and (problem := _damaged(fs, root, reader.crc32)):
        raise DamagedCheckpoint(f"checkpoint {path} is incomplete ({problem})")
    return template


def load_newest(base: str, read, warn=print):
    """(path, read(path)) of the newest complete checkpoint under `base` whose files pass
    their checksums as `read` loads them (with `load(..., verify=True)`); a damaged one is
    reported and an older one tried. None when there is none."""
    for _, path in reversed(list_checkpoints(base, warn)):
        try:
            return path, read(path)
        except DamagedCheckpoint as e:
            warn(f"{e}; falling back to an older one")
    return None


def check_model_shapes(path: str, model_state: dict[str, torch.Tensor]) -> None:
    """A clear error when the checkpoint's model does not match the configured one."""
    saved = {
        k[len("model.") :]: v for k, v in read_metadata(path).items() if k.startswith("model.")
    }
    missing = sorted(set(model_state) - set(saved))
    extra = sorted(set(saved) - set(model_state))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {extra[:5]} (was it saved with another model config?)"
        )
    for k, t in model_state.items():
        if tuple(saved[k]) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint {path}: {k} has shape {tuple(saved[k])} but the model config "
                f"gives {tuple(t.shape)}"
            )
