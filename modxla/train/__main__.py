"""python -m modxla.train: the same as modxla-train."""

import sys

from modxla.cli.train import main

sys.exit(main())
