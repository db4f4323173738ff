"""User-facing errors: bad input or a state the user can fix (no traceback, exit 2).

Every CLI catches `UserError` alone: anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

# The exit codes of every modxla command, read by the launcher (launch/pod.py) and the
# JobSet's podFailurePolicy (launch/jobset.py). RESTART codes mean "the run is intact: start
# it again and it resumes"; every other non-zero code means "stop: starting again repeats it".
EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected exception (a bug): its traceback is in the log
EXIT_BAD_INPUT = 2  # UserError: the config, a path or the run directory needs fixing
EXIT_DIVERGED = 3  # DivergenceError: resuming from the same checkpoint diverges again
EXIT_HUNG = 124  # a step did not finish within train.hang_timeout_s (as timeout(1))
EXIT_STOPPED = 143  # SIGTERM (128 + 15): every host saved the same step and stopped
EXIT_DISK_FULL = 4  # a save ran out of space; the previous checkpoint is intact
EXIT_CODES = {
    EXIT_OK: "finished",
    EXIT_CRASH: "crashed (a bug: see the traceback)",
    EXIT_BAD_INPUT: "bad input",
    EXIT_DIVERGED: "diverged",
    EXIT_DISK_FULL: "disk full",
    EXIT_HUNG: "hung step",
    EXIT_STOPPED: "stopped by a signal after saving",
}
RESTART = frozenset({EXIT_STOPPED, EXIT_HUNG})  # restart in place and resume


class UserError(Exception):
    """Base of the errors a command reports as `error: ...` with exit status 2."""

    exit_code = EXIT_BAD_INPUT


class DivergenceError(UserError):
    """The loss went non-finite or far above its recent median; nothing was saved after it."""

    exit_code = EXIT_DIVERGED  # a launcher must not retry it from the same checkpoint


def report(e: UserError) -> int:
    """Print a user error the way every modxla command does; returns its exit status."""
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
