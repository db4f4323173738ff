"""isoFLOP sweeps (the `modxla-isoflop` command; modxla/cli/isoflop.py, --help explains)."""

import sys

from modxla.cli.isoflop import TOLERANCE, VARIANTS, main, plan, size_overrides  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
