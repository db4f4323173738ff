# `make demo` and `make test` create the environment when it is missing, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modxla-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist); an idle worker takes queued tests from a busy one (a few
# module fixtures are then built in both). One more than this machine's 2 cores: with 2
# workers the suite kept 1.35 cores busy (user + sys over wall, 2026-12-03), the rest waiting
# on polls, sleeps and retries; with 3 it ran in 364 s, 1.7 cores busy.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist worksteal
# 8 virtual XLA CPU devices for SPMD (XLA_FLAGS device counts do not work with torch_xla).
XLA_CPU := PJRT_DEVICE=CPU CPU_NUM_DEVICES=8

.PHONY: venv demo test test-fast lint clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(XLA_CPU) $(PY) tools/demo.py

# pytest's exit 5 (no test collected) fails the target: CI must never pass on no tests.
NO_TESTS_FAIL = rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test: $(STAMP)
	@$(XLA_CPU) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS); $(NO_TESTS_FAIL)

# Everything that neither trains, compiles XLA graphs nor starts processes (not marked slow):
# under a minute.
test-fast: $(STAMP)
	@$(XLA_CPU) $(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS); $(NO_TESTS_FAIL)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
