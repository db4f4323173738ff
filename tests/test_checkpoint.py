"""Checkpoints: every tensor restored, resharding, exact resume after kill -9, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import fsspec
import pytest
import torch

from modxla.errors import EXIT_STOPPED
from modxla.io.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_model_shapes,
    latest_checkpoint,
    list_checkpoints,
    load,
    read_marker,
    read_metadata,
)
from tests.conftest import ROOT, TINY, read_metrics, run, train_args

# --- unit level, CPU tensors -------------------------------------------------------------


def _state(step):
    return {
        "model": {"w": torch.full((4, 3), float(step)), "b": torch.arange(3.0)},
        "meta": {"step": step, "note": "x"},
    }


def test_keep_last_k_and_round_trip(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step))
    ck.close()
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    out = load(latest_checkpoint(str(tmp_path)), _state(0))
    assert torch.equal(out["model"]["w"], torch.full((4, 3), 3.0))
    assert out["meta"] == {"step": 3, "note": "x"}


def test_fsspec_url_round_trip():
    # memory:// goes through the same fsspec writer and reader as gs://
    base = "memory://modxla-test/run/checkpoints"
    ck = Checkpointer(base, keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step))
    assert [s for s, _ in list_checkpoints(base)] == [2, 3]
    out = load(latest_checkpoint(base), _state(0))
    assert torch.equal(out["model"]["w"], torch.full((4, 3), 3.0))


def test_async_save_completes(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=5, async_save=True)
    ck.save(7, _state(7))
    ck.close()  # waits for the background write
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000007")


@pytest.mark.parametrize("damage", ["marker", "file", "empty_marker"])
def test_incomplete_checkpoint_is_skipped_with_a_message(tmp_path, damage):
    ck = Checkpointer(str(tmp_path), keep=5)
    ck.save(5, _state(5))
    newest = ck.save(10, _state(10))
    if damage == "marker":
        os.remove(Path(newest) / "COMPLETE")
    elif damage == "empty_marker":  # killed while the marker was being written
        (Path(newest) / "COMPLETE").write_text("")
    else:
        data = next(p for p in Path(newest).iterdir() if p.suffix == ".distcp")
        data.unlink()
    messages = []
    assert latest_checkpoint(str(tmp_path), warn=messages.append).endswith("step_00000005")
    assert len(messages) == 1 and "step_00000010 is incomplete" in messages[0]
    with pytest.raises(CheckpointError, match="is incomplete"):
        load(newest, _state(0))


def _flip(path: Path, offset: int = 64, n: int = 4096) -> None:
    """Damage a file in place: same size, different bytes (bit rot, a bad copy)."""
    data = bytearray(path.read_bytes())
    n = min(n, len(data) - offset)
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


def test_a_shard_damaged_in_place_is_refused_and_the_previous_one_loads(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=5)
    ck.save(5, _state(5))
    newest = ck.save(10, _state(10))
    info = json.loads((Path(newest) / "COMPLETE").read_text())
    assert set(info["crc32"]) == set(info["files"])  # every file has a checksum
    shard = next(p for p in Path(newest).iterdir() if p.suffix == ".distcp")
    _flip(shard)
    messages = []
    path = latest_checkpoint(str(tmp_path), warn=messages.append)
    assert path.endswith("step_00000005")
    assert len(messages) == 1 and f"{shard.name} fails its checksum" in messages[0]
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load(newest, _state(0))
    assert torch.equal(load(path, _state(0))["model"]["w"], torch.full((4, 3), 5.0))


def test_a_complete_step_is_never_deleted_to_be_rewritten(tmp_path, monkeypatch):
    ck = Checkpointer(str(tmp_path), keep=5)
    path = ck.save(5, _state(5))
    assert ck.save(5, _state(99)) is None  # already complete: skipped, not rewritten
    assert torch.equal(load(path, _state(0))["model"]["w"], torch.full((4, 3), 5.0))

    # a damaged step is rewritten, but into step_N.partial first: a kill mid-write (here an
    # exception from the writer) leaves the old folder as it was and no loadable partial
    _flip(next(p for p in Path(path).iterdir() if p.suffix == ".distcp"))
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def killed(state, storage_writer, planner):
        real_save(state, storage_writer=storage_writer, planner=planner)
        raise KeyboardInterrupt  # after the data, before the marker

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(5, _state(6))
    assert (Path(path) / "COMPLETE").exists() and Path(path + ".partial").exists()
    assert list_checkpoints(str(tmp_path)) == [(5, path)]  # the partial folder is never listed
    monkeypatch.setattr(dcp, "save", real_save)
    assert ck.save(5, _state(6)) == path
    assert not Path(path + ".partial").exists()
    assert torch.equal(load(path, _state(0))["model"]["w"], torch.full((4, 3), 6.0))


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(str(tmp_path / "step_00000001"), _state(0))
    path = Checkpointer(str(tmp_path)).save(1, _state(1))
    with pytest.raises(CheckpointError, match=r"w has shape \(4, 3\) but the model config gives"):
        check_model_shapes(path, {"w": torch.zeros(4, 5), "b": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"missing \['c'\]"):
        check_model_shapes(path, {"w": torch.zeros(4, 3), "b": torch.zeros(3), "c": torch.zeros(1)})


# --- the trainer, in subprocesses --------------------------------------------------------

ROUND_TRIP = textwrap.dedent("""
    import sys, torch
    from modxla.config import load_config
    from modxla.io.checkpoint import latest_checkpoint, read_metadata
    from modxla.io.logger import MetricsLogger
    from modxla.train.trainer import Trainer

    def states(t):
        model = {k: v.cpu() for k, v in t.model.state_dict().items()}
        opt = {f"{i}.{k}": v.cpu() for i, s in t.opt.state_dict()["state"].items()
               for k, v in s.items()}
        return model, opt

    run_dir, args = sys.argv[1], sys.argv[2:]
    # staged MoDE: MoD's router (None, fsdp), the experts over (expert, fsdp, tensor)
    args += ["model.moe.experts=4", "model.moe.every=2"]
    mesh = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]
    cfg = load_config("configs/tiny.yaml", args + mesh)
    t = Trainer(cfg, run_dir)
    t.fit(MetricsLogger(t.run_dir, cfg.train.steps, 0, enabled=False))
    before = states(t)
    keys = set(read_metadata(latest_checkpoint(t.ckpt_dir)))
    again = Trainer(cfg, run_dir)  # resumes from the checkpoint just written
    after = states(again)
    cfg8 = load_config("configs/tiny.yaml", args + ["mesh.data=8"])
    other_mesh = states(Trainer(cfg8, run_dir))
    torch.save({"before": before, "after": after, "other": other_mesh, "keys": keys,
                "step": again.step}, run_dir + "/states.pt")
""")


@pytest.mark.slow
def test_round_trip_on_a_2d_mesh_restores_every_tensor(tmp_path, data_cache):
    out = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={data_cache}", "train.steps=2", "train.log_every=1"]
    run(["-c", ROUND_TRIP, str(out), *args], 8)
    r = torch.load(out / "states.pt")
    assert r["step"] == 2
    (model, opt), (model2, opt2), (model3, opt3) = r["before"], r["after"], r["other"]
    saved_model = {k[len("model.") :] for k in r["keys"] if k.startswith("model.")}
    assert saved_model == set(model)  # none dropped, e.g. router (None, fsdp) on this mesh
    assert any(k.endswith("mlp.w1") and v.ndim == 3 for k, v in model.items())  # the experts
    n_params = len(model)
    assert len(opt) == 3 * n_params  # step, exp_avg, exp_avg_sq for every parameter
    for restored in ((model2, opt2), (model3, opt3)):
        for want, got in zip((model, opt), restored, strict=True):
            assert want.keys() == got.keys()
            for k in want:
                assert torch.equal(want[k], got[k]), k


def _losses(run_dir):
    if not (Path(run_dir) / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _cmd(run_dir, data_cache, *extra):
    return train_args(run_dir, data_cache, "train.log_every=1", *extra)


def _popen(args, devices=2):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    return subprocess.Popen(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, proc, timeout=300):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path, data_cache):
    steps = ["train.steps=16", "checkpoint.every=4", "optimizer.warmup_steps=4"]
    straight = tmp_path / "straight"
    run(_cmd(straight, data_cache, *steps), 2)
    expected = _losses(straight)

    broken = tmp_path / "broken"
    proc = _popen(_cmd(broken, data_cache, *steps))
    marker = broken / "checkpoints" / "step_00000008" / "COMPLETE"
    _wait_for(marker.exists, proc)
    _wait_for(lambda: max(_losses(broken), default=0) >= 9, proc)  # it went on past 8
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait()
    proc.stderr.close()
    run(_cmd(broken, data_cache, *steps, "--resume"), 2)
    got = _losses(broken)
    assert sorted(got) == list(range(1, 17))  # records after the checkpoint were replaced
    for step in range(9, 17):
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_at_the_step_reached(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = _popen(_cmd(run_dir, data_cache, "train.steps=100000"))
    _wait_for(lambda: max(_losses(run_dir), default=0) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a second signal must not corrupt the save
    assert proc.wait(timeout=120) == EXIT_STOPPED  # stopped before train.steps: restart to resume
    err = proc.stderr.read()
    proc.stderr.close()
    assert "saving a checkpoint" in err
    found = list_checkpoints(str(run_dir / "checkpoints"))
    assert len(found) == 1
    step, path = found[0]
    assert 3 <= step < 100000
    assert max(_losses(run_dir)) <= step
    info = json.loads((Path(path) / "COMPLETE").read_text())
    assert info["step"] == step and info["files"]
    assert {"model.embed.weight", "meta.torch_rng"} <= set(read_metadata(path))
    longer = (f"train.steps={step + 1}", "--resume", "--allow-schedule-change")
    proc = run(_cmd(run_dir, data_cache, *longer), 2)
    assert f"resuming from {path} (step {step})" in proc.stderr
    assert sorted(_losses(run_dir))[-1] == step + 1


@pytest.mark.slow
def test_resume_refuses_another_run_and_records_what_it_may_change(tmp_path, data_cache, capsys):
    """modxla-train's main in this process (native CPU device: no compile, no interpreter
    start per call): --resume needs a checkpoint; another model or capacity is refused, files
    untouched; another schedule needs the flag and is recorded at the step it took effect;
    resume=never never mixes two runs."""
    from modxla.cli.train import main

    cpu = ("train.device=cpu", "model.mod.capacity=0.125")

    def train(run_dir, *extra):
        code = main(_cmd(run_dir, data_cache, *extra)[2:])  # without "-m modxla.train"
        return code, capsys.readouterr().err

    code, err = train(tmp_path / "new", "train.steps=1", *cpu, "--resume")
    assert code == 2 and "resume: no complete checkpoint in" in err
    r = tmp_path / "r"
    assert train(r, "train.steps=2", *cpu)[0] == 0
    kept = {name: (r / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    for change, said in (
        ("model.d_model=32", "model.d_model 64 -> 32"),
        ("model.mod.capacity=0.5", "model.mod.capacity 0.125 -> 0.5"),  # a 12.5% run
    ):
        code, err = train(r, "train.steps=2", *cpu, change)
        assert code == 2 and f"is another run: {said}" in err, err
        assert {name: (r / name).read_text() for name in kept} == kept  # untouched
    code, err = train(r, "train.steps=3", *cpu)
    assert code == 2 and "train.steps 2 -> 3" in err and "--allow-schedule-change" in err
    code, err = train(r, "train.steps=3", *cpu, "--allow-schedule-change")
    assert code == 0 and "schedule changed at step 2: train.steps 2 -> 3" in err
    changes = [rec for rec in read_metrics(r) if "config_changes" in rec]
    assert changes == [
        {
            "step": 2,
            "config_changes": {
                "train.steps": [2, 3],
                "checkpoint.allow_schedule_change": [False, True],
            },
        }
    ]
    assert max(_losses(r)) == 3
    code, err = train(r, "train.steps=3", *cpu, "checkpoint.resume=never")
    assert code == 2 and "resume=never, but" in err
    assert max(_losses(r)) == 3  # the run's metrics are not truncated


def test_a_run_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(
    tmp_path, data_cache, capsys
):
    from modxla.train.trainer import Trainer
    from tests.conftest import cpu_trainer

    over = ("train.steps=4", "checkpoint.every=2")
    t, _ = cpu_trainer(tmp_path, data_cache, "run", *over)
    newest = Path(t.ckpt_dir) / "step_00000004"
    _flip(next(p for p in newest.iterdir() if p.suffix == ".distcp"), n=4096)
    again = Trainer(t.cfg, tmp_path / "run")
    assert again.step == 2
    err = capsys.readouterr().err
    assert "step_00000004 is incomplete" in err and "fails its checksum" in err
    assert "resuming from" in err and "step_00000002 (step 2)" in err


@pytest.mark.parametrize("base", ["local", "memory"])
def test_a_save_reads_none_of_its_files_back(tmp_path, monkeypatch, base):
    """The CRC-32s in COMPLETE are computed as the files are written, not by re-reading them."""
    import builtins

    import fsspec.implementations.memory as memfs

    base = str(tmp_path) if base == "local" else f"memory://modxla-test/{tmp_path.name}/ck"
    read = []
    real_open, real_mem_open = builtins.open, memfs.MemoryFileSystem._open

    def counting_open(file, mode="r", *a, **kw):
        if "r" in mode and "+" not in mode and str(tmp_path) in os.fspath(file):
            read.append(os.fspath(file))
        return real_open(file, mode, *a, **kw)

    def counting_mem_open(self, path, mode="rb", *a, **kw):
        if "r" in mode and "+" not in mode:
            read.append(path)
        return real_mem_open(self, path, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(memfs.MemoryFileSystem, "_open", counting_mem_open)
    ck = Checkpointer(base, keep=5)
    path = ck.save(3, _state(3))
    data = [p for p in read if p.endswith((".distcp", ".metadata"))]
    monkeypatch.undo()
    assert data == []  # no shard (nor .metadata) was opened for reading
    info = read_marker(path)
    assert set(info["crc32"]) == set(info["files"]) and info["files"]
    fs, root = fsspec.core.url_to_fs(path)
    for name, crc in info["crc32"].items():  # the recorded CRCs are those of the files
        assert f"{zlib.crc32(fs.cat_file(root + '/' + name)):08x}" == crc, name
    assert torch.equal(
        load(latest_checkpoint(base), _state(0))["model"]["w"], _state(3)["model"]["w"]
    )


def _save_on_host(rank: int, world: int, port: int, base: str) -> None:
    import torch.distributed as dist

    import modxla.io.checkpoint as ckpt

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    reread = []
    ckpt._checksums = lambda fs, root, names: reread.extend(names) or {}
    state = {"model": {f"host{rank}": torch.full((1000,), float(rank))}}
    ckpt.Checkpointer(base, keep=5, is_main=rank == 0).save(4, state)
    dist.barrier()
    assert reread == [], reread  # process 0 read back none of the files, its own or others'
    dist.destroy_process_group()


@pytest.mark.slow  # two hosts started by torchrun
def test_every_host_s_checksums_reach_the_marker(tmp_path):
    """Two hosts (a gloo group), each writing its own shard: process 0 writes the CRC-32s of
    both into COMPLETE, gathered from the hosts, without reading a file back."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_on_host, args=(r, 2, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    path = str(tmp_path / "step_00000004")
    info = read_marker(path)
    shards = sorted(n for n in info["files"] if n.endswith(".distcp"))
    assert len(shards) == 2 and set(info["crc32"]) == set(info["files"])
    for name, crc in info["crc32"].items():
        assert f"{zlib.crc32((tmp_path / 'step_00000004' / name).read_bytes()):08x}" == crc
    assert latest_checkpoint(str(tmp_path)) == path  # verified against the files


# a console script's main with every read of a checkpoint shard counted (bytes, by file),
# written as JSON to $READS at exit: what a resume or a sample costs in reads
COUNT_READS = textwrap.dedent(
    """
    import atexit, builtins, importlib, io, json, os, sys
    real, counts = io.open, {}

    class Counted:
        def __init__(self, f, key):
            self._f, self._key = f, key
        def _add(self, n):
            counts[self._key] = counts.get(self._key, 0) + (n or 0)
        def read(self, n=-1):
            data = self._f.read(n)
            self._add(len(data))
            return data
        def readinto(self, b):
            n = self._f.readinto(b)
            self._add(n)
            return n
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self._f.close()
        def __getattr__(self, name):
            return getattr(self._f, name)

    def counting_open(file, mode="r", *a, **kw):
        f = real(file, mode, *a, **kw)
        path = os.fspath(file) if not isinstance(file, int) else ""
        if "r" in mode and path.endswith(".distcp"):
            return Counted(f, os.path.relpath(path, os.environ["RUN"]))
        return f

    io.open = builtins.open = counting_open
    atexit.register(lambda: json.dump(counts, real(os.environ["READS"], "w")))
    main = importlib.import_module(sys.argv.pop(1)).main
    sys.exit(main(sys.argv[1:]))
    """
)


def _reads(tmp_path, run_dir, module, args):
    out = tmp_path / "reads.json"
    env = {**os.environ, "RUN": str(run_dir), "READS": str(out), "CPU_NUM_DEVICES": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", COUNT_READS, module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


@pytest.mark.slow
def test_resume_and_sampling_read_each_shard_once_and_still_refuse_a_damaged_one(
    tmp_path, data_cache
):
    """Checksums are verified as the shards are read: a resume (modxla-train) and a sample
    (modxla-generate) read every shard's bytes exactly once, and a damaged newest step is
    still found and passed over for the previous one."""
    r = tmp_path / "run"
    over = ["train.device=cpu", "train.steps=4", "checkpoint.every=2", "train.log_every=1"]
    args = train_args(r, data_cache, *over)[2:]  # no -m: the module is the counter's argument
    run(["-m", "modxla.train", *args], 1)
    newest = r / "checkpoints" / "step_00000004"
    sizes = {f"checkpoints/step_00000004/{p.name}": p.stat().st_size for p in newest.iterdir()}
    shards = {k: v for k, v in sizes.items() if k.endswith(".distcp")}
    assert shards
    reads, err = _reads(tmp_path, r, "modxla.cli.train", args)  # resumes at 4, nothing to do
    assert "resuming from" in err and "(step 4)" in err
    assert reads == shards  # every byte of every shard once: not verified, then loaded
    prompt = ["--run-dir", str(r), "--prompt", "def ", "--max-tokens", "4", "--device", "cpu"]
    reads, _ = _reads(tmp_path, r, "modxla.cli.generate", prompt)
    assert reads == shards

    _flip(next(newest.glob("*.distcp")))
    reads, err = _reads(tmp_path, r, "modxla.cli.train", args)
    assert "step_00000004 is incomplete" in err and "fails its checksum" in err
    assert "falling back to an older one" in err and "(step 2)" in err
    older = {k.replace("step_00000004", "step_00000002") for k in shards}
    assert older <= set(reads)  # the fallback's shards were read (once each, then trained)
