"""Data pipeline throughput (the `modxla-bench-data` command; modxla/cli/bench_data.py)."""

import sys

from modxla.cli.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
