"""The `modxla-calibrate-routing` command (modxla/calibration.py; --help explains)."""

import sys

from modxla.calibration import main

if __name__ == "__main__":
    sys.exit(main())
