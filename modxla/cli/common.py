"""What every modxla command shares: how its --help reads and how it reports an error."""

from __future__ import annotations

import argparse

EXIT_STATUS = (
    "Exit status: 0 done, 2 bad input (one `error: ...` line on stderr, no traceback); "
    "see modxla/errors.py."
)


def parser(prog: str, doc: str, epilog: str = EXIT_STATUS) -> argparse.ArgumentParser:
    """The command's parser: its module docstring (what it reads and writes) as the help."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
