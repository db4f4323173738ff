"""A corpus in a bucket (gs://, against the local GCS emulator): read as the same local files,
cached by the objects' metadata, an edited object rebuilding the caches, damage re-fetched."""

import json
from pathlib import Path

import numpy as np
import pytest

from modxla.config import load_config
from modxla.data import (
    DataError,
    build_streams,
    load_documents,
    load_tokenizer,
    sources,
    train_tokenizer,
)
from modxla.data.sources import source_signature, stdlib_files
from modxla.data.tokenizer import default_tokenizer_path, tokenizer_key
from tests.conftest import read_metrics, run, train_args
from tests.gcs_emulator import BUCKET, gcs

VOCAB = 384


def write_corpus(folder: Path, first: int, files: int = 3, per_file: int = 8) -> list[Path]:
    """`files` jsonl files of real Python source, `per_file` documents each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, names = [], stdlib_files()[first:]
    for i in range(files):
        rows = [
            {"text": open(f, encoding="utf-8").read()[:3000], "id": j}
            for j, f in enumerate(names[i * per_file : (i + 1) * per_file])
        ]
        paths.append(folder / f"part{i}.jsonl")
        paths[-1].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return paths


def upload(paths: list[Path], prefix: str) -> str:
    fs = gcs()
    for p in paths:
        fs.put_file(str(p), f"{BUCKET}/{prefix}/{p.name}")
    return f"gs://{BUCKET}/{prefix}"


def cfg_for(source, cache, tokenizer=""):
    over = {
        "data.source": source,
        "data.tokenizer": tokenizer,
        "data.seq_len": 32,
        "data.cache_dir": str(cache),
        "data.val_fraction": 0.2,
        "model.vocab_size": VOCAB,
    }
    return load_config(None, [f"{k}={v}" for k, v in over.items()]).data


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cfg = load_config(None, ["data.max_chars=200000"]).data
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    return str(train_tokenizer(load_documents(cfg), path, VOCAB, "bpe", max_chars=200000))


def test_a_bucket_corpus_reads_and_packs_as_its_local_files(gcs_emulator, tmp_path, tokenizer):
    paths = write_corpus(tmp_path / "local", first=200)
    url = upload(paths, "corpus-read")
    cache = tmp_path / "cache"
    local = cfg_for(str(tmp_path / "local" / "*.jsonl"), tmp_path / "local-cache", tokenizer)
    remote = cfg_for(f"{url}/*.jsonl", cache, tokenizer)
    assert load_documents(remote)["text"] == load_documents(local)["text"]
    a, b = build_streams(local, VOCAB, False), build_streams(remote, VOCAB, False)
    assert len(a.train) > 1000 and np.array_equal(a.train, b.train)
    assert np.array_equal(a.val, b.val)
    # the prefix names the same objects as the glob: the same signature, the same copies
    assert load_documents(cfg_for(url, cache, tokenizer))["text"] == load_documents(local)["text"]
    (copies,) = (cache / "objects").iterdir()
    assert sorted(p.name for p in copies.rglob("*.jsonl")) == [p.name for p in paths]
    one = load_documents(cfg_for(f"{url}/part1.jsonl", cache, tokenizer))["text"]
    assert one == [json.loads(x)["text"] for x in paths[1].read_text().splitlines()]


def test_an_edited_object_changes_the_signature_and_rebuilds(
    gcs_emulator, tmp_path, tokenizer, monkeypatch, capsys
):
    paths = write_corpus(tmp_path / "local", first=300)
    url = upload(paths, "corpus-edit")
    cache = tmp_path / "cache"
    cfg = cfg_for(f"{url}/*.jsonl", cache, tokenizer)
    sig, tok_before = source_signature(cfg), default_tokenizer_path(cfg, VOCAB)
    first = build_streams(cfg, VOCAB, False)
    (old_copies,) = (cache / "objects").iterdir()
    assert source_signature(cfg) == sig  # nothing changed: the same key, the copies reused
    real = sources._download
    monkeypatch.setattr(sources, "_download", lambda *a: pytest.fail("downloaded again"))
    again = build_streams(cfg, VOCAB, False)
    assert np.array_equal(first.train, again.train)

    # the same bytes count, other bytes: only the object's generation and checksums tell
    body = paths[0].read_bytes()
    edited = body.replace(b"import", b"IMPORT", 1)
    assert len(edited) == len(body) and edited != body
    gcs().pipe_file(f"{BUCKET}/corpus-edit/part0.jsonl", edited)
    monkeypatch.setattr(sources, "_download", real)
    new_sig = source_signature(cfg)
    assert new_sig["objects"] != sig["objects"]
    assert tokenizer_key(cfg, VOCAB)["corpus"] == new_sig  # the tokenizer cache follows it
    assert default_tokenizer_path(cfg, VOCAB) != tok_before
    second = build_streams(cfg, VOCAB, False)
    assert not np.array_equal(first.train, second.train)
    assert len(list((cache / "packed").iterdir())) == 2  # a new packed corpus, the old kept
    assert len(list((cache / "objects").iterdir())) == 2
    assert "IMPORT" in load_documents(cfg)["text"][0]

    # a damaged copy (cut short) is fetched again with a note; a dead download's temporary
    # is removed; neither is read as data
    (copies,) = set((cache / "objects").iterdir()) - {old_copies}
    (copy,) = copies.rglob("part2.jsonl")
    size = copy.stat().st_size
    copy.write_bytes(copy.read_bytes()[: size // 2])
    stale = copy.parent / ".part2.jsonl.999999999.part"
    stale.write_bytes(b"half")
    capsys.readouterr()
    assert load_documents(cfg)["text"] == json_texts(paths[:1], edited) + json_texts(paths[1:])
    assert "cached copy of gs://modxla-test/corpus-edit/part2.jsonl is damaged" in (
        capsys.readouterr().err
    )
    assert copy.stat().st_size == size and not stale.exists()


def json_texts(paths: list[Path], body: bytes | None = None) -> list[str]:
    lines = [x for p in paths for x in (body or p.read_bytes()).decode().splitlines()]
    return [json.loads(x)["text"] for x in lines]


def test_bad_bucket_sources_are_one_line_errors(gcs_emulator, tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    upload([tmp_path / "a.txt", tmp_path / "b.jsonl"], "corpus-bad")
    for source, message in (
        (f"gs://{BUCKET}/corpus-none/*.jsonl", "no objects match gs://modxla-test/corpus-none"),
        (f"gs://{BUCKET}/corpus-bad/missing.jsonl", "no such object: gs://modxla-test/corpus-bad"),
        (f"gs://{BUCKET}/corpus-bad", r"mixes file types \['json', 'text'\]"),
    ):
        with pytest.raises(DataError, match=message):
            load_documents(cfg_for(source, tmp_path / "cache", tokenizer))


@pytest.mark.slow
def test_the_trainer_on_a_bucket_corpus_gives_the_losses_of_its_local_files(gcs_emulator, tmp_path):
    paths = write_corpus(tmp_path / "local", first=400, files=3, per_file=10)
    url = upload(paths, "corpus")
    steps = ["train.steps=3", "train.log_every=1", "train.device=cpu"]
    losses, tokenizers = {}, {}
    for name, source in (("local", str(tmp_path / "local" / "*.jsonl")), ("gcs", f"{url}/*.jsonl")):
        run_dir = tmp_path / name
        run(train_args(run_dir, tmp_path / f"{name}-cache", f"data.source={source}", *steps), 1)
        losses[name] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
        sp = load_tokenizer(str(run_dir / "tokenizer.model"))
        tokenizers[name] = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(VOCAB)]
    assert url == "gs://modxla-test/corpus"
    # trained on the same text, cached apart (the files differ only in the trainer's temp name)
    assert tokenizers["gcs"] == tokenizers["local"]
    assert len(losses["gcs"]) == 3 and all(4 < x < 7 for x in losses["gcs"])  # ~ln(384)
    assert losses["gcs"] == pytest.approx(losses["local"], rel=0, abs=1e-6)
