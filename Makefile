# Two-command quickstart: `make demo` (install, train the CPU demo, score it) and `make test`.
# Everything installs into a virtual environment, .venv by default; `make test VENV=/path/to/env` uses another.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
.PHONY: install demo test test-fast lint

$(PYTHON):
	python3 -m venv $(VENV)

install: $(PYTHON)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) train.py --preset demo

test: install
	$(PYTHON) -m pytest -m "not bench" --durations=25

test-fast: install
	$(PYTHON) -m pytest -m "not slow"

lint: install
	$(PYTHON) -m ruff check .
