# make setup | make demo | make test | make bench
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/demo.yaml
ARGS    ?=

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch first: a bare "torch" requirement would pull a multi-GB CUDA build on these machines.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distillery run $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/labeling.py
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/tune_compress.py

clean:
	rm -rf runs .pytest_cache
