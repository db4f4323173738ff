"""Sample text from a run (the `modxla-generate` command; modxla/cli/generate.py)."""

import sys

from modxla.cli.generate import clip_to_context, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
