"""One retry policy for every run-directory read and write (object stores above all).

Transient errors, the store's or the network's (5xx, 408, 429, a connection reset or a reply
dropped, a timeout), are retried with bounded exponential backoff and jitter; anything else
(403, a 404 where the object must exist, a bad request) is raised at once, a denied access as
a one-line `StoreError`.

One policy, two places it acts: gcsfs retries each HTTP request itself (6 tries, 1-32 s
apart), and asks `is_transient` here whether to (`install` puts it into gcsfs.retry), so
each of those retries is decided and counted here; `retrying` wraps a whole run-directory
operation for what escapes gcsfs's loop (errors raised outside it, or after its last try).
A retried operation must be idempotent: whole-object uploads are; the callers make the
rest so (a rename whose source is gone and whose target has the right size is done; a delete
of something already gone is done).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from modxla.errors import UserError

T = TypeVar("T")

ATTEMPTS = 4  # tries of a whole operation (each request inside already had gcsfs's 6)
BASE_S = 0.5  # backoff before the 2nd try; doubles each time
CAP_S = 8.0  # never longer than this between two tries

# Exception classes (by name, so that aiohttp, requests and google-auth need not be
# imported) that mean "try again": the connection, not the request, failed.
_TRANSIENT_NAMES = {
    "ConnectionError",  # builtin (reset, refused, broken pipe) and requests'
    "TimeoutError",  # builtin, asyncio's
    "FSTimeoutError",  # fsspec's sync wrapper
    "ServerDisconnectedError",  # aiohttp: the reply was dropped
    "ClientConnectionError",
    "ClientPayloadError",  # aiohttp: the reply was cut short
    "ChunkedEncodingError",  # requests: likewise
    "Timeout",  # requests
    "ProxyError",  # gcsfs raises it for a 502
    "SSLError",
    "ChecksumError",  # gcsfs: the bytes arrived damaged
    "RefreshError",  # google-auth: the token service did not answer
}
_TRANSIENT_CODES = {408, 429}  # and every 5xx

_lock = threading.Lock()
_retries = 0


class StoreError(UserError):
    """The object store refused a run-directory operation for good (denied, missing)."""


class MissingError(StoreError, FileNotFoundError):
    """An object that must exist does not (a FileNotFoundError too, for callers that ask)."""


def _code(e: BaseException) -> int | None:
    """The HTTP status an error carries (gcsfs's HttpError.code, aiohttp's .status)."""
    for name in ("code", "status"):
        try:
            return int(getattr(e, name))
        except (AttributeError, TypeError, ValueError):
            continue
    return None


def is_transient(e: BaseException) -> bool:
    """True when trying the same request again may succeed."""
    code = _code(e)
    if code is not None:
        if code == 401:  # an expired token is refreshed on the next try
            return "Invalid Credentials" in str(e)
        return code >= 500 or code in _TRANSIENT_CODES
    return any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__)


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed try `attempt` (0-based): in [d/2, d], d = min(cap,
    base * 2**attempt). The jitter spreads hosts that failed together."""
    d = min(CAP_S, BASE_S * 2**attempt)
    return d / 2 + (rng or random).uniform(0, d / 2)


def count() -> int:
    """Retries so far in this process (both gcsfs's per-request ones and `retrying`'s)."""
    return _retries


def _counted(what: str, e: BaseException, wait: float | None = None) -> None:
    global _retries
    with _lock:
        _retries += 1
        n = _retries
    from modxla.io.logger import say  # logger imports rundir, which imports this

    first = (str(e) or type(e).__name__).splitlines()[0][:160]
    after = f" in {wait:.1f} s" if wait is not None else ""
    say(f"io retry {n}: {what} after {type(e).__name__}: {first}{after}")


def denied(e: BaseException) -> bool:
    """A 403 (gcsfs raises it as OSError("Forbidden: ...")) or a 401 that is not expiry."""
    forbidden = isinstance(e, PermissionError) or str(e).startswith("Forbidden")
    return forbidden or _code(e) in (401, 403)


def retrying(
    fn: Callable[..., T],
    *args,
    what: str,
    attempts: int = ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs,
) -> T:
    """`fn(*args, **kwargs)`, tried again on transient errors (`what` names it in the log).

    A denied access becomes a `StoreError` at once; other errors are raised unchanged; the
    last transient one is raised once `attempts` tries have failed (a crash the launcher
    restarts: the store may be back by then).
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                if denied(e) and not isinstance(e, StoreError):
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise StoreError(
                        f"access denied to {what} ({first}): check the credentials' "
                        "permissions on the bucket"
                    ) from None
                raise
            if attempt == attempts - 1:
                raise
            wait = backoff(attempt)
            _counted(what, e, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def install(fs) -> None:
    """Make gcsfs's per-request retries follow `is_transient` and count them (idempotent)."""
    if not type(fs).__module__.startswith("gcsfs"):
        return
    import gcsfs.retry

    if getattr(gcsfs.retry.is_retriable, "modxla", False):
        return

    def is_retriable(e: BaseException) -> bool:  # gcsfs sleeps and retries when True
        if is_transient(e):
            _counted("a storage request", e)
            return True
        return False

    is_retriable.modxla = True
    gcsfs.retry.is_retriable = is_retriable
