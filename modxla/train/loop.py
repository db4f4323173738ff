"""What the trainer and the predictor trainer share: the step counter, checkpoints (resume from
the newest complete one, a save every N steps and at the end) and SIGTERM (finish the step,
save it, stop: the command then exits 143 and a launcher restarts it).

A stop is agreed by all hosts: each reports after every step whether it was signalled, and
all stop after the step where any was, so every host saves that same step (a host that went
on alone would wait in the next step's collectives for hosts that are saving)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable

from modxla.io.checkpoint import Checkpointer, CheckpointError, list_checkpoints, load_newest
from modxla.io.logger import say

RESUME_MODES = ("auto", "must", "never")


class StopRequest:
    """Set by SIGTERM (a preemption's notice) while `on_sigterm()` is active: the loop saves
    after the current step and stops. Installed before the run is built, so a signal during
    setup is honoured too (after the first step)."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def on_sigterm(self):
        def on_term(signum, frame):  # finish the step, save, exit cleanly
            first, self.requested = not self.requested, True  # the flag before any I/O
            if first:  # a second signal changes nothing
                say(f"signal {signum}: saving a checkpoint after this step")

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


class Loop:
    """A loop of `steps` steps that checkpoints into `ckpt_dir`. Subclasses say what a
    checkpoint holds (`state`, with `meta` for what is not a tensor) and run `fit`."""

    def __init__(
        self, rt, ckpt_dir: str, steps: int, every: int, keep: int, async_save=False, stop=None
    ):
        self.rt, self.steps, self.every = rt, steps, every
        self.step = 0
        self.stop = stop or StopRequest()
        self.watchdog = None  # a train.watchdog.Watchdog: a hung step exits 124
        self.on_checkpoint: list[Callable[[], None]] = []  # before each save (logs upload)
        self.ckpt = Checkpointer(ckpt_dir, keep, async_save, rt.is_main)

    def resume(self, mode: str, read: Callable[[str], dict]) -> dict | None:
        """`read(path)` of the newest complete checkpoint (it loads with checksums verified
        as the files are read: a damaged one -> an older one), or None for a fresh start;
        `never`: refused where checkpoints exist; `must`: an error when there are none."""
        if mode not in RESUME_MODES:
            raise CheckpointError(f"resume must be one of {', '.join(RESUME_MODES)}: {mode!r}")
        if mode == "never":
            found = list_checkpoints(self.ckpt.base, warn=say)
            if found:  # a new run here would mix with the old one's checkpoints
                raise CheckpointError(
                    f"resume=never, but {self.ckpt.base} holds checkpoints of a run (newest: "
                    f"{found[-1][1]}): use another run directory, or delete them to start over"
                )
            return None
        found = load_newest(self.ckpt.base, read, warn=say)
        if found is None and mode == "must":
            raise CheckpointError(f"resume: no complete checkpoint in {self.ckpt.base}")
        return found[1] if found else None

    def state(self) -> dict:
        """What a checkpoint of the current step holds."""
        raise NotImplementedError

    def before_save(self) -> None:
        """A last check before anything is written (the trainer's divergence guard)."""

    def marker(self) -> dict:
        """What the checkpoint's COMPLETE marker records besides its files (JSON)."""
        return {}

    def save(self) -> str | None:
        self.before_save()
        for hook in self.on_checkpoint:  # metrics never run ahead of a checkpoint
            hook()
        path = self.ckpt.save(self.step, self.state(), self.marker())
        if path is None:
            say(f"checkpoint step {self.step} is already complete; not rewritten")
        else:
            say(f"checkpoint step {self.step} -> {path}")
        return path

    def run(self, step: Callable[[int], None], stop=lambda: False, after=lambda n: None) -> bool:
        """Run `step(n)` for n = step + 1 .. steps (it trains step n and queues its logging),
        then `after(n)` once the step's closures ran; save every `every` steps, at the end and
        on SIGTERM; leave early, saving nothing, when `stop()` says so. True when all `steps`
        ran."""
        saved = None
        dog = self.watchdog or contextlib.nullcontext()
        beat = self.watchdog.beat if self.watchdog else lambda: None
        try:
            with dog:
                while self.step < self.steps:
                    step(self.step + 1)
                    self.step += 1
                    self.rt.sync()  # runs the step's pending closures (logging)
                    after(self.step)
                    beat()
                    if stop():
                        return False
                    stopping = self.rt.hosts.agree(self.stop.requested)
                    if stopping or (self.every and self.step % self.every == 0):
                        if self.watchdog:
                            self.watchdog.first("save")
                        saved = self.save()
                        beat()
                    if stopping:
                        say(f"stop requested: left at step {self.step}, checkpoint {saved}")
                        return False
                if not (self.every and self.step % self.every == 0):
                    self.save()  # skipped when the step is already complete
        finally:
            self.ckpt.close()
        return True
