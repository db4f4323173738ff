"""Distributed checkpoints (torch.distributed.checkpoint), local or any fsspec URL (gs://...).

Layout: `<dir>/step_00000100/` holds the DCP files and, written last, `COMPLETE` (JSON). A
folder without it was cut short (kill -9, preemption mid-write) and is never loaded.

Saving: each XLA tensor is copied to the host as its unique local shards (`_CpuShards`) and
written with torch_xla's SPMDSavePlanner. torch_xla 2.9 silently drops a tensor that is sharded
on one mesh axis and replicated on another when it is handed over as a sharded XLA tensor;
deduplicating the shards here first avoids that (tests check every tensor of a 2-D mesh).

Loading: tensors are read as whole CPU tensors and then placed and sharded like a fresh run,
so a checkpoint restores onto any mesh shape (resharding for free; one host copy per tensor).
"""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import torch
import torch.distributed.checkpoint as dcp

# Single-process saves are intended; these warnings would print on every checkpoint.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional")
warnings.filterwarnings("ignore", message="The function definition for SavePlanner.set_up_planner")

MARKER = "COMPLETE"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete everywhere, or does not fit the model."""


def _fs(path: str):
    fs, root = fsspec.core.url_to_fs(path)
    return fs, root


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def step_dir(base: str, step: int) -> str:
    return _join(base, f"{PREFIX}{step:08d}")


def list_checkpoints(base: str, warn=print) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first; incomplete ones are reported."""
    fs, root = _fs(base)
    if not fs.exists(root):
        return []
    out = []
    for entry in sorted(fs.ls(root, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
            continue
        path = _join(base, name)
        problem = _incomplete(fs, entry)
        if problem:
            warn(f"checkpoint {path} is incomplete ({problem}); skipping it")
        else:
            out.append((int(name[len(PREFIX) :]), path))
    return sorted(out)


def _manifest(fs, root: str) -> dict[str, int]:
    files = fs.ls(root, detail=True)
    return {f["name"].rstrip("/").rsplit("/", 1)[-1]: int(f["size"]) for f in files}


def _incomplete(fs, root: str) -> str | None:
    """Why a checkpoint folder cannot be loaded, or None if every file it wrote is there."""
    marker = _join(root, MARKER)
    if not fs.exists(marker):
        return f"no {MARKER} marker"
    try:
        with fs.open(marker, "r") as f:
            expected = json.load(f).get("files", {})
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return f"{MARKER} marker unreadable"
    present = _manifest(fs, root)
    for name, size in expected.items():
        if present.get(name) != size:
            return f"{name} is missing or truncated"
    return None


def latest_checkpoint(base: str, warn=print) -> str | None:
    found = list_checkpoints(base, warn)
    return found[-1][1] if found else None


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


def _writer(path: str):
    # per_thread_copy_ahead=0: the tensors are on the host already. With the default, DCP
    # picks its GPU-stream loader as soon as jax/torchax is installed (torch_xla's
    # mark_sharding imports torchax, whose privateuse1 device says "available") and fails.
    if "://" in path:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(path, per_thread_copy_ahead=0)
    return dcp.FileSystemWriter(path, per_thread_copy_ahead=0)


def _reader(path: str):
    if "://" in path:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path)
    return dcp.FileSystemReader(path)


@dataclass
class Checkpointer:
    """Saves every N steps (optionally in a background thread), keeps the newest K."""

    base: str
    keep: int = 3
    async_save: bool = False
    is_main: bool = True

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(1) if self.async_save else None
        self._pending: Future | None = None

    def save(self, step: int, state: dict, extra: dict | None = None) -> str:
        """Write `state` (nested dicts of tensors and plain values) as step `step`."""
        self.wait()
        path = step_dir(self.base, step)
        fs, root = _fs(path)
        if self.is_main and fs.exists(root):
            fs.rm(root, recursive=True)  # a leftover of an interrupted save of this step
        host = _to_host(state)  # device -> host now; the write may go on in the background
        if self._pool is None:
            self._write(path, step, host, extra or {})
        else:
            self._pending = self._pool.submit(self._write, path, step, host, extra or {})
        return path

    def _write(self, path: str, step: int, host: dict, extra: dict) -> None:
        from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

        dcp.save(host, storage_writer=_writer(path), planner=SPMDSavePlanner())
        if self.is_main:
            fs, root = _fs(path)
            info = {"step": step, "time": time.time(), "files": _manifest(fs, root), **extra}
            tmp = _join(root, f".{MARKER}.tmp")
            with fs.open(tmp, "w") as f:
                json.dump(info, f)
            fs.mv(tmp, _join(root, MARKER))  # last, and whole: marks the folder loadable
            self._prune()

    def wait(self) -> None:
        """Block until a background save has finished (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _prune(self) -> None:
        found = list_checkpoints(self.base, warn=lambda _: None)
        fs, _ = _fs(self.base)
        for _, path in found[: -self.keep]:
            fs.rm(_fs(path)[1], recursive=True)

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


def read_metadata(path: str) -> dict[str, torch.Size]:
    """Global shape of every tensor in a checkpoint, by flattened key."""
    md = _reader(path).read_metadata()
    return {k: m.size for k, m in md.state_dict_metadata.items() if hasattr(m, "size")}


def load(path: str, template: dict) -> dict:
    """Fill `template` (nested dicts of CPU tensors and plain values) from a checkpoint."""
    fs, root = _fs(path)
    if not fs.exists(root):
        raise CheckpointError(f"checkpoint {path} does not exist")
    problem = _incomplete(fs, root)
    if problem:
        raise CheckpointError(f"checkpoint {path} is incomplete ({problem})")
    dcp.load(template, storage_reader=_reader(path))
    return template


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
