"""Goodput: each attempt's timeline in goodput.jsonl, and the summary modxla-goodput prints."""

from __future__ import annotations

import json

import pytest

from modxla.analysis.goodput import CAUSES, summarize
from modxla.cli.goodput import main
from tests.conftest import read_metrics, run, train_args


def _events(attempt, *rows):
    return [
        {"attempt": attempt, "event": e, "time": t, "step": s, **extra}
        for e, t, s, *more in rows
        for extra in [more[0] if more else {}]
    ]


def two_attempts():
    """The first attempt is killed after step 5 (last checkpoint 4); the second resumes from 4
    and finishes at 6."""
    first = _events(
        1,
        ("start", 0.0, 0),
        ("setup", 10.0, 0),
        ("first_step", 30.0, 1),  # compile 20
        ("step", 31.0, 2),
        ("save_start", 31.0, 2),
        ("save_end", 33.0, 2),
        ("step", 34.0, 3),
        ("step", 35.0, 4),
        ("save_start", 35.0, 4),
        ("save_end", 37.0, 4),
        ("step", 38.0, 5),  # recomputed by attempt 2
        ("end", 40.0, 5, {"cause": "crashed", "exit_code": 1}),
    )
    second = _events(
        2,
        ("start", 100.0, 4),
        ("setup", 105.0, 4),
        ("first_step", 115.0, 5),
        ("step", 116.0, 6),
        ("save_start", 116.0, 6),
        ("save_end", 118.0, 6),
        ("end", 119.0, 6, {"cause": "finished", "exit_code": 0}),
    )
    return first + second


def test_two_attempts_add_up_to_their_wall_clock():
    s = summarize(two_attempts())
    a, b = s["attempts"]
    assert (a["wall_s"], b["wall_s"], s["wall_s"]) == (40.0, 19.0, 59.0)
    assert a["badput_s"] == {"setup": 10, "compile": 20, "checkpoint": 4, "lost": 1, "other": 2}
    assert b["badput_s"] == {"setup": 5, "compile": 10, "checkpoint": 2, "lost": 0, "other": 1}
    assert (a["productive_s"], b["productive_s"], s["productive_s"]) == (3.0, 1.0, 4.0)
    for row in (a, b):  # exactly: every second of an attempt has one cause
        assert row["productive_s"] + sum(row["badput_s"].values()) == row["wall_s"]
    assert s["productive_s"] + sum(s["badput_s"].values()) == s["wall_s"]
    assert s["badput_s"]["lost"] == 1.0  # step 5 of the first attempt
    assert (s["lost_steps"], s["productive_steps"]) == (1, 6)
    assert (a["cause"], b["cause"], a["last_saved"], b["resumed_at"]) == (
        "crashed",
        "finished",
        4,
        4,
    )
    assert s["goodput"] == pytest.approx(4 / 59)
    assert s["between_attempts_s"] == 60.0  # not in wall_s


def test_unsaved_steps_of_an_unfinished_last_attempt_are_lost():
    s = summarize([r for r in two_attempts() if r["attempt"] == 1])
    assert s["badput_s"]["lost"] == 1.0 and s["attempts"][0]["last_step"] == 5


def test_cli_reads_two_attempts_of_a_run(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "run"
    cpu = ("train.device=cpu", "checkpoint.every=2", "train.log_every=1")
    run(train_args(run_dir, data_cache, *cpu, "train.steps=6"), devices=1)
    run(
        train_args(run_dir, data_cache, *cpu, "train.steps=8", "--allow-schedule-change"),
        devices=1,
    )
    assert read_metrics(run_dir)[-1]["step"] == 8
    lines = (run_dir / "goodput.jsonl").read_text().splitlines()
    events = [(r["attempt"], r["event"]) for r in map(json.loads, lines)]
    assert events[0] == (1, "start") and events[-1] == (2, "end")
    assert main([str(run_dir), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert [a["attempt"] for a in s["attempts"]] == [1, 2]
    assert [a["cause"] for a in s["attempts"]] == ["finished", "finished"]
    assert s["attempts"][1]["resumed_at"] == 6
    assert 0 < s["goodput"] <= 1
    assert s["goodput"] + sum(s["badput"][c] for c in CAUSES) == pytest.approx(1, abs=1e-6)
    assert s["lost_steps"] == 0 and s["productive_steps"] == 8
    assert main([str(run_dir)]) == 0
    assert "goodput:" in capsys.readouterr().out
    assert main([str(tmp_path / "none")]) == 2


def test_a_url_run_directory_is_staged_and_uploaded_whole():
    from modxla.analysis.goodput import GOODPUT, Recorder, read_records
    from modxla.io import rundir

    url = "memory://goodput-test/run"
    path = rundir.join(url, GOODPUT)
    first = Recorder(url)
    first.event("start", 0, t=1.0)
    first.event("save_start", 2, t=2.0)
    first.sync()  # at a checkpoint
    first.event("save_end", 2, t=3.0)  # not uploaded: the process dies before the next sync
    assert [r["event"] for r in read_records(path)] == ["start", "save_start"]
    second = Recorder(url)
    assert second.attempt == 2
    second.event("start", 2, t=10.0)
    second.event("end", 2, t=11.0, cause="finished")
    second.close()
    got = [(r["attempt"], r["event"]) for r in read_records(path)]
    assert got == [(1, "start"), (1, "save_start"), (2, "start"), (2, "end")]
    assert not Recorder(url, enabled=False).attempt  # not the writer host: writes nothing
    assert summarize(read_records(path))["wall_s"] == 2.0
