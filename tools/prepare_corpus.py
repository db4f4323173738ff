"""`modxla-prepare-corpus` from a checkout (modxla/cli/prepare_corpus.py)."""

import sys

from modxla.cli.prepare_corpus import main

if __name__ == "__main__":
    sys.exit(main())
