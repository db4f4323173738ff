"""`modxla-plot` from a checkout (modxla/cli/plot.py)."""

import sys

from modxla.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
