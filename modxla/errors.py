"""User-facing errors: bad input or a state the user can fix (no traceback, exit 2).

Every CLI catches `UserError` alone: anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """Base of the errors a command reports as `error: ...` with exit status 2."""

    exit_code = 2


class DivergenceError(UserError):
    """The loss went non-finite or far above its recent median; nothing was saved after it."""

    exit_code = 3  # not bad input: a launcher should not retry it from the same checkpoint


def say(msg: str) -> None:
    """A progress or status line on stderr, `[modxla] ...`, that does not break tqdm bars."""
    from tqdm import tqdm

    tqdm.write(f"[modxla] {msg}", file=sys.stderr)


def report(e: UserError) -> int:
    """Print a user error the way every modxla command does; returns its exit status."""
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
