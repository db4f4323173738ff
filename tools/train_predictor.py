"""`modxla-train-predictor` from a checkout (modxla/cli/train_predictor.py)."""

import sys

from modxla.cli.train_predictor import main

if __name__ == "__main__":
    sys.exit(main())
