# Two commands do everything on a fresh machine:
#   make quickstart   train on embedded data (no downloads)
#   make test         run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-slow test-all clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) scripts/train.py experiment=quickstart

test: $(VENV)/.installed
	$(PY) -m pytest

# Slower tests: multi-process DDP, and real pretrained weights when VPT_TEST_WEIGHTS points
# at them (for example ../shared/weights); skipped cleanly otherwise.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow

test-all: test test-slow

clean:
	rm -rf outputs multirun .pytest_cache
