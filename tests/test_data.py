"""Data pipeline: sources, tokenizer, packing, host sharding, exact resume, clear errors."""

import json

import numpy as np
import pytest

from modxla.config import load_config
from modxla.data import (
    EOS_ID,
    BatchLoader,
    DataError,
    build_streams,
    load_documents,
    load_tokenizer,
    pipeline,
    split_documents,
    train_tokenizer,
)
from modxla.data.sources import stdlib_files
from modxla.parallel.mesh import MeshError, device_rows

VOCAB = 384


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small BPE model trained on real text: the embedded standard-library source."""
    cfg = load_config(None, ["data.max_chars=300000"]).data
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    return str(train_tokenizer(load_documents(cfg), path, VOCAB, "bpe", max_chars=300000))


@pytest.fixture
def corpus(tmp_path):
    """Ten documents of real Python source as separate text files."""
    root = tmp_path / "corpus"
    root.mkdir()
    docs = []
    for i, f in enumerate(stdlib_files()[40:50]):
        text = open(f, encoding="utf-8").read()[:3000]
        (root / f"doc{i:02d}.txt").write_text(text)
        docs.append(text)
    return root, docs


def data_cfg(source, tmp_path, tokenizer, **kw):
    over = {
        "data.source": str(source),
        "data.tokenizer": tokenizer,
        "data.seq_len": 32,
        "data.cache_dir": str(tmp_path / "cache"),
        "data.val_fraction": 0.2,
        "model.vocab_size": VOCAB,
        **kw,
    }
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_tokenizer_round_trips_real_text(tokenizer):
    sp = load_tokenizer(tokenizer)
    assert sp.vocab_size() == VOCAB
    text = open(stdlib_files()[100], encoding="utf-8").read()[:5000]
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # whitespace and newlines survive (identity normalization)
    assert len(ids) < 0.8 * len(text)  # merges learned: bytes alone would give >= 1 per char
    assert sp.decode(sp.encode("naïve → ü")) == "naïve → ü"  # byte fallback


def test_packing_keeps_every_token_once_in_order_with_separators(corpus, tmp_path, tokenizer):
    root, docs = corpus
    cfg = data_cfg(root, tmp_path, tokenizer)
    streams = build_streams(cfg.data, VOCAB, progress=False)
    sp = load_tokenizer(tokenizer)
    is_val = split_documents(len(docs), 0.2, 0)
    assert is_val.sum() == 2
    for split, docs_in in (
        ("train", [d for d, v in zip(docs, is_val, strict=True) if not v]),
        ("val", [d for d, v in zip(docs, is_val, strict=True) if v]),
    ):
        expected = np.concatenate([sp.encode(d) + [EOS_ID] for d in docs_in])
        assert np.array_equal(getattr(streams, split), expected)
        seqs = streams.sequences(split, 32)
        assert seqs.shape[1] == 33
        flat = seqs.reshape(-1)
        assert np.array_equal(flat, expected[: len(flat)])  # in order, none repeated
        assert len(expected) - len(flat) < 33  # only the final partial sequence is dropped
    assert (streams.train == EOS_ID).sum() == 8  # one separator after each train document


def test_second_build_reuses_the_cache(corpus, tmp_path, tokenizer, monkeypatch):
    cfg = data_cfg(corpus[0], tmp_path, tokenizer)
    first = build_streams(cfg.data, VOCAB, progress=False)
    monkeypatch.setattr(pipeline, "_pack", lambda *a, **k: pytest.fail("re-tokenized"))
    second = build_streams(cfg.data, VOCAB, progress=False)
    assert np.array_equal(first.train, second.train)


def test_jsonl_and_parquet_sources_with_a_text_field(tmp_path, tokenizer, corpus):
    _, docs = corpus
    rows = [{"body": d, "id": i} for i, d in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.jsonl", "a.parquet"):
        cfg = data_cfg(tmp_path / name, tmp_path, tokenizer, **{"data.text_field": "body"})
        ds = load_documents(cfg.data)
        assert ds["text"] == docs
    cfg = data_cfg(tmp_path / "a.jsonl", tmp_path, tokenizer, **{"data.text_field": "nope"})
    with pytest.raises(DataError, match="no column 'nope'"):
        load_documents(cfg.data)


def _seqs(n, t=4):
    return np.arange(n * (t + 1), dtype=np.int32).reshape(n, t + 1)


@pytest.mark.parametrize("n", [40, 37])  # 37: batches straddle epoch boundaries
@pytest.mark.parametrize("hosts", [1, 2, 4])
@pytest.mark.parametrize(
    "shape",
    [(1, 8, 1, 1), (2, 4, 1, 1), (8, 1, 1, 1), (2, 2, 1, 2), (1, 4, 1, 2)]
    + [(1, 2, 2, 2), (2, 1, 4, 1)],  # with an expert axis
)
def test_each_device_gets_its_rows_of_the_one_process_global_batch(hosts, shape, n):
    """P hosts, each building its loader as the trainer does, over 8 devices (2 hosts: 4 each;
    device d of the mesh on host d // per_host): the step's input on every host is the global
    batch, and every device holds its rows of it, those of one process alone."""
    seqs = _seqs(n)
    single = BatchLoader(seqs, 8, seed=3)  # one process: the reference
    loaders = [BatchLoader(seqs, 8, seed=3) for _ in range(hosts)]
    rows = device_rows(8, shape).reshape(-1, 2)  # by device id (mesh order)
    per_host = 8 // hosts
    for _ in range(12):  # three epochs
        whole = next(single).numpy()
        arrays = [next(ld).numpy() for ld in loaders]  # what each host passes to the feed
        for d, (lo, hi) in enumerate(rows):
            assert np.array_equal(arrays[d // per_host][lo:hi], whole[lo:hi])
        # the devices of one tensor index hold every row once: the step sees B rows
        tiles = sorted(map(tuple, rows[:: shape[3]]))
        assert tiles == [
            (i * 8 // len(tiles), (i + 1) * 8 // len(tiles)) for i in range(len(tiles))
        ]
        assert sum(hi - lo for lo, hi in tiles) == 8


def test_device_rows_follow_data_then_fsdp_and_replicate_over_tensor():
    rows = device_rows(16, (2, 2, 1, 2))
    assert rows[0, 0, 0, 0].tolist() == rows[0, 0, 0, 1].tolist() == [0, 4]  # tensor: replicas
    assert rows[0, 1, 0, 0].tolist() == [4, 8] and rows[1, 0, 0, 0].tolist() == [8, 12]
    with pytest.raises(MeshError, match="not divisible by the batch shards"):
        device_rows(6, (2, 2, 1, 1))


def test_device_rows_split_the_batch_over_the_expert_axis_too():
    rows = device_rows(16, (2, 1, 2, 2))  # data-major, then fsdp, then expert
    assert rows.shape == (2, 1, 2, 2, 2)
    assert rows[0, 0, 0, 0].tolist() == rows[0, 0, 0, 1].tolist() == [0, 4]
    assert rows[0, 0, 1, 0].tolist() == [4, 8] and rows[1, 0, 0, 0].tolist() == [8, 12]
    with pytest.raises(MeshError, match="data x fsdp x expert = 8"):
        device_rows(12, (2, 2, 2, 1))


def test_each_epoch_is_a_permutation_and_seeds_differ():
    loader = BatchLoader(_seqs(40), 8, seed=1)
    for _ in range(3):
        seen = np.concatenate([next(loader)[:, 0].numpy() // 5 for _ in range(5)])
        assert sorted(seen.tolist()) == list(range(40))
    a = BatchLoader(_seqs(40), 8, seed=1).global_indices(0)
    b = BatchLoader(_seqs(40), 8, seed=2).global_indices(0)
    assert not np.array_equal(a, b)


def test_resume_continues_exactly():
    seqs = _seqs(50)
    straight = BatchLoader(seqs, 6, seed=7)
    expected = [next(straight).numpy() for _ in range(20)]
    first = BatchLoader(seqs, 6, seed=7)
    for _ in range(9):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = BatchLoader(seqs, 6, seed=7)
    resumed.load_state_dict(state)
    for i in range(9, 20):
        assert np.array_equal(next(resumed).numpy(), expected[i])
    with pytest.raises(DataError, match="global_batch=6 but this run has 12"):
        BatchLoader(seqs, 12, seed=7).load_state_dict(state)


def test_local_paths_and_hub_names_are_told_apart(tmp_path):
    from modxla.data.sources import is_local

    (tmp_path / "corpus").mkdir()
    for local in ("stdlib", str(tmp_path / "corpus"), "data/*.jsonl", "./x", "~/d", "a/b.txt"):
        assert is_local(local), local
    for hub in ("allenai/c4", "wikitext", "HuggingFaceFW/fineweb-edu"):
        assert not is_local(hub), hub


def test_missing_path(tmp_path, tokenizer):
    cfg = data_cfg(tmp_path / "nowhere", tmp_path, tokenizer)
    with pytest.raises(DataError, match=r"no such file or directory: .*nowhere"):
        build_streams(cfg.data, VOCAB)


def test_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    cfg = data_cfg(tmp_path / "empty", tmp_path, tokenizer)
    with pytest.raises(DataError, match=r"empty.* holds no text"):
        build_streams(cfg.data, VOCAB)


def test_undecodable_bytes_name_the_file(tmp_path, tokenizer):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ok.txt").write_text("fine text\n")
    (tmp_path / "bad" / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    cfg = data_cfg(tmp_path / "bad", tmp_path, tokenizer)
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8 text \(byte 3"):
        build_streams(cfg.data, VOCAB)


def test_corpus_shorter_than_one_sequence(tmp_path, tokenizer):
    (tmp_path / "short.txt").write_text("def f():\n    return 1\n")
    cfg = data_cfg(tmp_path / "short.txt", tmp_path, tokenizer, **{"data.val_fraction": 0.0})
    streams = build_streams(cfg.data, VOCAB, progress=False)
    with pytest.raises(DataError, match=r"short\.txt has \d+ tokens, fewer than one sequence"):
        streams.sequences("train", 32)


def test_tokenizer_vocab_must_match_the_model(corpus, tmp_path, tokenizer):
    cfg = data_cfg(corpus[0], tmp_path, tokenizer, **{"model.vocab_size": 512})
    with pytest.raises(DataError, match="has 384 pieces but model.vocab_size is 512"):
        build_streams(cfg.data, 512)


@pytest.fixture
def trainings(monkeypatch):
    """Every tokenizer `resolve_tokenizer` trains, by its output path (training still runs)."""
    from modxla.data import tokenizer as tok

    paths = []

    def spy(texts, out_path, *a, **k):
        paths.append(str(out_path))
        return real(texts, out_path, *a, **k)

    real = tok.train_tokenizer
    monkeypatch.setattr(tok, "train_tokenizer", spy)
    return paths


def test_editing_the_corpus_trains_a_new_tokenizer(corpus, tmp_path, trainings):
    root, _ = corpus
    cfg = data_cfg(root, tmp_path, "")
    first = build_streams(cfg.data, VOCAB, progress=False)
    assert trainings == [first.tokenizer]
    (root / "doc03.txt").write_text("def edited():\n    return 'other text'\n" * 40)
    second = build_streams(cfg.data, VOCAB, progress=False)
    assert second.tokenizer != first.tokenizer  # a new cache entry, not the stale model
    assert trainings == [first.tokenizer, second.tokenizer]  # trained on the edited corpus
    sp = load_tokenizer(second.tokenizer)
    docs = load_documents(cfg.data)
    expected = [sp.encode(d) + [EOS_ID] for d in docs["text"]]  # packed with the new one
    assert sum(map(len, expected)) == len(second.train) + len(second.val)


def test_another_text_field_trains_another_tokenizer(corpus, tmp_path, trainings):
    from modxla.data.tokenizer import file_digest, resolve_tokenizer

    _, docs = corpus
    others = [open(f, encoding="utf-8").read()[:3000] for f in stdlib_files()[60:70]]
    rows = [{"a": a, "b": b} for a, b in zip(docs, others, strict=True)]
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg_a = data_cfg(tmp_path / "two.jsonl", tmp_path, "", **{"data.text_field": "a"})
    cfg_b = data_cfg(tmp_path / "two.jsonl", tmp_path, "", **{"data.text_field": "b"})
    tok_a = resolve_tokenizer(cfg_a.data, VOCAB)
    tok_b = resolve_tokenizer(cfg_b.data, VOCAB)
    assert tok_a != tok_b and trainings == [tok_a, tok_b]
    assert file_digest(tok_a) != file_digest(tok_b)  # trained on different text
    assert resolve_tokenizer(cfg_a.data, VOCAB) == tok_a and len(trainings) == 2


def test_an_unchanged_corpus_reuses_its_tokenizer(corpus, tmp_path, trainings):
    import os

    from modxla.data.tokenizer import resolve_tokenizer

    root, _ = corpus
    cfg = data_cfg(root, tmp_path, "")
    tok = resolve_tokenizer(cfg.data, VOCAB)
    made = os.stat(tok).st_mtime_ns
    # settings that do not reach the tokenizer's training do not retrain it
    other = data_cfg(root, tmp_path, "", **{"data.seed": 5, "data.val_fraction": 0.5})
    assert resolve_tokenizer(other.data, VOCAB) == tok and trainings == [tok]
    # an edit trains another; putting the file back as it was (bytes and mtime) finds the first
    doc = root / "doc00.txt"
    before, st = doc.read_bytes(), doc.stat()
    doc.write_text("print('edited')\n" * 100)
    edited = resolve_tokenizer(cfg.data, VOCAB)
    assert edited != tok and trainings == [tok, edited]
    doc.write_bytes(before)
    os.utime(doc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert resolve_tokenizer(cfg.data, VOCAB) == tok and trainings == [tok, edited]
    assert os.stat(tok).st_mtime_ns == made  # not rewritten


def test_every_trainer_setting_and_the_training_cap_key_the_tokenizer(
    corpus, tmp_path, monkeypatch
):
    from modxla.data import tokenizer as tok

    cfg = data_cfg(corpus[0], tmp_path, "").data
    base = tok.default_tokenizer_path(cfg, VOCAB)
    assert tok.default_tokenizer_path(cfg, 512) != base
    monkeypatch.setattr(tok, "MAX_TRAIN_CHARS", 1000)
    assert tok.default_tokenizer_path(cfg, VOCAB) != base
    monkeypatch.undo()
    real = tok.trainer_settings
    monkeypatch.setattr(tok, "trainer_settings", lambda *a: {**real(*a), "split_digits": False})
    assert tok.default_tokenizer_path(cfg, VOCAB) != base


def _packed_dirs(cache):
    return sorted(p for p in (cache / "packed").iterdir())


def _first_batches(streams, n=4):
    loader = BatchLoader(streams.sequences("train", 32), 4, seed=0)
    return [next(loader).numpy() for _ in range(n)]


def test_a_half_written_packed_cache_is_rebuilt_never_read(corpus, tmp_path, tokenizer, capsys):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    root, _ = corpus
    clean = build_streams(data_cfg(root, tmp_path / "clean", tokenizer).data, VOCAB, False)
    want_train, want_val = np.array(clean.train), np.array(clean.val)
    want_batches = _first_batches(clean)

    # a build killed (SIGKILL) after writing its streams, before they are renamed into place
    cache = tmp_path / "killed" / "cache"
    script = (
        "import os, signal, sys\n"
        "from modxla.config import load_config\n"
        "from modxla.data import pipeline\n"
        "pipeline.fsync_file = lambda p: os.kill(os.getpid(), signal.SIGKILL)\n"
        "pipeline.build_streams(load_config(None, sys.argv[1:]).data, 384, False)\n"
    )
    over = [
        f"data.source={root}", f"data.tokenizer={tokenizer}", "data.seq_len=32",
        f"data.cache_dir={cache}", "data.val_fraction=0.2", f"model.vocab_size={VOCAB}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, *over], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (left,) = _packed_dirs(cache)  # only the temporary folder, with the full-size streams
    assert left.name.startswith(".") and (left / "train.bin").stat().st_size > 0
    cfg = data_cfg(root, tmp_path / "killed", tokenizer)
    after_kill = build_streams(cfg.data, VOCAB, progress=False)
    (out,) = _packed_dirs(cache)  # the dead process' temporary is gone
    assert not out.name.startswith(".")
    assert np.array_equal(after_kill.train, want_train)
    assert np.array_equal(after_kill.val, want_val)

    # damage under the key itself: a truncated stream, an empty meta.json (what a kill during
    # the old in-place write of meta.json left); each is rebuilt, with a note, never read
    size = (out / "train.bin").stat().st_size
    for name, keep, reason in (
        ("train.bin", size // 2, f"train.bin has {size // 2} bytes, meta.json says {size}"),
        ("meta.json", 0, "Expecting value"),
    ):
        capsys.readouterr()
        os.truncate(out / name, keep)
        again = build_streams(cfg.data, VOCAB, progress=False)
        err = capsys.readouterr().err
        assert f"packed corpus {out} is incomplete ({reason}" in err and "rebuilding it" in err
        assert np.array_equal(again.train, want_train) and np.array_equal(again.val, want_val)
        for got, want in zip(_first_batches(again), want_batches, strict=True):
            assert np.array_equal(got, want)  # the trainer's batches of a clean build
    capsys.readouterr()
    build_streams(cfg.data, VOCAB, progress=False)
    assert "rebuilding" not in capsys.readouterr().err  # a whole cache is read, not rebuilt
