"""The `modxla-inspect-routing` command (modxla/routing_report.py; --help explains)."""

import sys

from modxla.routing_report import main

if __name__ == "__main__":
    sys.exit(main())
