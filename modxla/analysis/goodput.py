"""Goodput: the share of a run's wall-clock spent on steps that count, and badput by cause.

Each attempt (each start of modxla-train on a run directory) appends its timeline to
<run-dir>/goodput.jsonl, one JSON record per event (written by the writer host only):

    {"attempt": 2, "event": "setup", "time": 1764693000.5, "step": 4, ...}

events, in order: `start` (its time is the process's start of training, before setup),
`setup` (data, model build and resume done; `setup_s` times the parts), `first_step` (the
first step of the attempt: compile), `step` (progress, every train.log_every steps),
`save_start` / `save_end` (a checkpoint), `end` (`cause`: finished, stopped (signal, exit 143),
diverged, hung, error (a user error, its `exit_code`), crashed, interrupted; absent when the
process was killed outright). A local run directory is appended in place; a URL (gs://) is
staged locally and uploaded whole at every checkpoint and at the end, like metrics.jsonl, so
a host killed without warning loses the records after its last checkpoint.

`summarize(records)` (pure) splits every attempt's wall-clock (start to end, or to its last
record) into productive step time and badput: setup, compile (the first step), checkpoint
(saves), lost (steps after the point the next attempt resumed from: recomputed; for the last
attempt, its steps after its last save unless it finished) and other (teardown, a hung step,
anything without step progress). The time between attempts is not counted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time

from modxla.io import rundir

GOODPUT = "goodput.jsonl"
CAUSES = ("setup", "compile", "checkpoint", "lost", "other")


def read_records(path: str) -> list[dict]:
    """The records of a goodput.jsonl (a line cut short by a crash is skipped)."""
    if not rundir.exists(path):
        return []
    out = []
    for line in rundir.read_text(path).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            out.append(rec)
    return out


class Recorder:
    """Appends one attempt's events to <run-dir>/goodput.jsonl (a no-op unless `enabled`)."""

    def __init__(self, run_dir: str, enabled: bool = True) -> None:
        self.enabled, self.run_dir = enabled, str(run_dir)
        self.attempt = 0
        self._lock = threading.Lock()
        if not enabled:
            return
        self.target = rundir.join(self.run_dir, GOODPUT)
        self.remote = rundir.is_url(self.run_dir)
        old = read_records(self.target)
        self.attempt = 1 + max((int(r.get("attempt", 0)) for r in old), default=0)
        if self.remote:
            self.root = tempfile.mkdtemp(prefix="modxla-goodput-")
            self.path = os.path.join(self.root, GOODPUT)
            with open(self.path, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in old))
        else:
            self.path = self.target.removeprefix("file://")

    def event(self, event: str, step: int, t: float | None = None, **extra) -> None:
        if not self.enabled:
            return
        rec = {
            "attempt": self.attempt,
            "event": event,
            "time": time.time() if t is None else t,
            "step": step,
        }
        rec.update(extra)
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def sync(self) -> None:
        """Upload the staged file whole (a no-op for a local run directory)."""
        if self.enabled and self.remote:
            with self._lock:
                rundir.put_file(self.path, self.target)

    def close(self) -> None:
        if not self.enabled:
            return
        self.sync()
        if self.remote:
            shutil.rmtree(self.root, ignore_errors=True)


def _attempts(records: list[dict]) -> list[list[dict]]:
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(int(r["attempt"]), []).append(r)
    out = [sorted(g, key=lambda r: r["time"]) for g in groups.values()]  # stable: file order
    return sorted(out, key=lambda g: g[0]["time"])


def _resumed_at(events: list[dict]) -> int:
    for r in events:
        if r["event"] in ("setup", "start"):
            return int(r["step"])
    return int(events[0]["step"])


def summarize(records: list[dict]) -> dict:
    """Goodput and badput by cause over all attempts in `records` (see the module doc)."""
    attempts = _attempts(records)
    rows, gaps = [], 0.0
    for i, events in enumerate(attempts):
        end = next((r for r in events if r["event"] == "end"), None)
        cause = end.get("cause", "unknown") if end else "unknown (no end record)"
        saves = [int(r["step"]) for r in events if r["event"] == "save_end"]
        if i + 1 < len(attempts):
            cutoff = _resumed_at(attempts[i + 1])  # steps after it were done again
            gaps += max(0.0, attempts[i + 1][0]["time"] - events[-1]["time"])
        elif cause == "finished":
            cutoff = math.inf
        else:
            cutoff = max(saves, default=_resumed_at(events))
        bad = dict.fromkeys(CAUSES, 0.0)
        productive, good_steps, lost_steps = 0.0, 0, 0
        state = "setup"
        for prev, cur in zip(events, events[1:], strict=False):
            if prev["event"] == "end":
                break
            ev = prev["event"]
            if ev == "setup":
                state = "compile"
            elif ev in ("first_step", "save_end", "step"):
                state = "steps"
            elif ev == "save_start":
                state = "checkpoint"
            dt = cur["time"] - prev["time"]
            if state != "steps":
                if state == "compile" and cur["event"] == "first_step":
                    good = int(cur["step"]) <= cutoff
                    good_steps, lost_steps = good_steps + good, lost_steps + (not good)
                bad[state] += dt
                continue
            a, b = int(prev["step"]), int(cur["step"])
            if b <= a:
                bad["other"] += dt
                continue
            lost = max(0, b - max(a, cutoff)) if cutoff != math.inf else 0
            bad["lost"] += dt * lost / (b - a)
            productive += dt * (b - a - lost) / (b - a)
            good_steps, lost_steps = good_steps + b - a - lost, lost_steps + lost
        last = end if end else events[-1]
        rows.append(
            {
                "attempt": int(events[0]["attempt"]),
                "cause": cause,
                "resumed_at": _resumed_at(events),
                "last_step": int(last["step"]),
                "last_saved": max(saves, default=None),
                "wall_s": last["time"] - events[0]["time"],
                "productive_s": productive,
                "badput_s": bad,
                "productive_steps": good_steps,
                "lost_steps": lost_steps,
            }
        )
    wall = sum(r["wall_s"] for r in rows)
    productive = sum(r["productive_s"] for r in rows)
    bad = {c: sum(r["badput_s"][c] for r in rows) for c in CAUSES}
    share = (lambda s: s / wall) if wall > 0 else (lambda s: 0.0)
    return {
        "attempts": rows,
        "wall_s": wall,
        "productive_s": productive,
        "goodput": share(productive),
        "badput_s": bad,
        "badput": {c: share(s) for c, s in bad.items()},
        "productive_steps": sum(r["productive_steps"] for r in rows),
        "lost_steps": sum(r["lost_steps"] for r in rows),
        "between_attempts_s": gaps,  # not counted in wall_s
    }
