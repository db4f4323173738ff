"""`modxla-isoflop` from a checkout (modxla/cli/isoflop.py)."""

import sys

from modxla.cli.isoflop import main

if __name__ == "__main__":
    sys.exit(main())
