# `make demo` and `make test` each create/refresh .venv, install the package, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test quick lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of PyTorch, which pip finds on this machine; pinned first so no resolver pulls a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]" "torch==2.13.0"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tangentlens demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider
	$(VENV)/bin/ruff check src tests benchmarks experiments scripts

quick: $(STAMP)  # the suite without the tests marked slow (for development)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments scripts

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
