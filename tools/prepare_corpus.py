"""Manual pages as a plain-text corpus (the `modxla-prepare-corpus` command; --help explains)."""

import sys

from modxla.cli.prepare_corpus import main

if __name__ == "__main__":
    sys.exit(main())
