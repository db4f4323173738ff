"""`modxla-plan-memory` from a checkout (modxla/cli/plan_memory.py)."""

import sys

from modxla.cli.plan_memory import main

if __name__ == "__main__":
    sys.exit(main())
