"""`modxla-calibrate-routing` from a checkout (modxla/cli/calibrate_routing.py)."""

import sys

from modxla.cli.calibrate_routing import main

if __name__ == "__main__":
    sys.exit(main())
