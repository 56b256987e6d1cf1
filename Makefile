# The two quick-start commands (make demo, make test) set themselves up on a fresh machine:
# they create .venv with Python 3.11 and install qcompile (editable) with its dev extra.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m qcompile.demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

lint: $(STAMP)
	$(PY) -m ruff check .

test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
