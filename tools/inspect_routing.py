"""`modxla-inspect-routing` from a checkout (modxla/cli/inspect_routing.py)."""

import sys

from modxla.cli.inspect_routing import main

if __name__ == "__main__":
    sys.exit(main())
