"""Command-line tools installed as console scripts (setup.cfg); tools/ keeps thin wrappers
so `python tools/NAME.py` works from a checkout."""
