"""`modxla-generate` from a checkout (modxla/cli/generate.py)."""

import sys

from modxla.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
