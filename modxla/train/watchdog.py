"""A hung step ends the run instead of holding the pod: when no step completes within the bound,
every thread's Python stack goes to the log and to <run-dir>/hangs/, and the process exits
124 (EXIT_HUNG), which the launchers read as "restart and resume", like a preemption.

Until the first step completes, and during the first save (imports, the first write), the
bound is train.hang_first_step_s (30 min): room to compile. After that it is
train.hang_timeout_s when set, else measured: max(10 x the median step, 10 min), room for an
evaluation's first compile and a later save.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time

from modxla.errors import EXIT_HUNG
from modxla.io import rundir

MIN_BOUND_S = 600.0
SAVE_DUMP_S = 30.0  # the run directory may be what hangs: the exit does not wait longer


class Watchdog:
    def __init__(self, out_dir: str, host: int, timeout_s: float, first_step_s: float):
        self.out_dir, self.host = out_dir, host
        self.timeout_s, self.first_step_s = timeout_s, first_step_s
        self.times: list[float] = []  # seconds between beats, newest last
        self.last = time.monotonic()
        self.on_hang = None  # called before the exit (the goodput record); errors ignored
        self._cold = False  # what runs until the next beat runs for the first time
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="modxla-watchdog", daemon=True)

    def bound(self) -> float:
        if self._cold or not self.times:
            return self.first_step_s
        if self.timeout_s > 0:
            return self.timeout_s
        return max(10 * statistics.median(self.times[-50:]), MIN_BOUND_S)

    def first(self, what: str) -> None:
        """`what` (e.g. "save") runs next: the first time, it gets the first-step bound."""
        if what not in self._seen:
            self._seen.add(what)
            self._cold = True

    def beat(self) -> None:
        """A step (or a save) completed."""
        now = time.monotonic()
        if not self._cold:  # a first save is no step time
            self.times.append(now - self.last)
        self._cold = False
        self.last = now

    def __enter__(self):
        self.last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            waited, bound = time.monotonic() - self.last, self.bound()
            if waited > bound:
                self._fire(waited, bound)

    def _fire(self, waited: float, bound: float) -> None:
        try:
            if self.on_hang:
                self.on_hang()
        except Exception:  # noqa: BLE001, S110 (the exit must happen whatever this does)
            pass
        head = (
            f"[modxla] hung: no step completed for {waited:.0f} s (bound {bound:.0f} s); "
            f"exiting {EXIT_HUNG} to be restarted. Every thread's stack:\n"
        )
        with tempfile.TemporaryFile("w+") as f:
            f.write(head)
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            dump = f.read()
        sys.stderr.write(dump)
        sys.stderr.flush()
        saver = threading.Thread(target=self._save, args=(dump,), daemon=True)
        saver.start()
        saver.join(SAVE_DUMP_S)
        os._exit(EXIT_HUNG)  # the main thread is stuck: no cleanup can be waited for

    def _save(self, dump: str) -> None:
        try:
            name = f"host{self.host}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
            rundir.makedirs(rundir.join(self.out_dir, "hangs"))
            rundir.write_text(rundir.join(self.out_dir, "hangs", name), dump)
        except Exception as e:  # noqa: BLE001 (the exit must happen whatever this does)
            sys.stderr.write(f"[modxla] could not write the stack dump: {e}\n")
