"""The paper's figures from run directories (the `modxla-plot` command; modxla/cli/plot.py)."""

import sys

from modxla.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
