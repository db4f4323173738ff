"""Train the causal routing predictors of a finished run, post hoc, on a frozen model.

    python tools/train_predictor.py --run-dir runs/demo [--steps 300] [--init auto]

The same as the `modxla-train-predictor` command (modxla/predictor.py; --help explains).
"""

import sys

from modxla.predictor import main

if __name__ == "__main__":
    sys.exit(main())
