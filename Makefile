# make setup | make demo | make test | make bench
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/demo.yaml
RUN_DIR ?= runs/demo
ARGS    ?=

.PHONY: setup demo test test-slow test-cluster test-fast bench clean

setup: $(STAMP)

# torch first: a bare "torch" requirement would pull a multi-GB CUDA build on these machines.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# every stage, then the endpoint: started, one request of each kind sent and printed, stopped
# (RUN_DIR=... elsewhere; CONFIG=... another config; ARGS="key=value ..." overrides)
demo: $(STAMP)
	$(BIN)/distillery run $(CONFIG) run_dir=$(RUN_DIR) $(ARGS)
	$(BIN)/distillery serve $(RUN_DIR)/bundle --port 18431 --demo

# the default suite (about 7.5 min on 2 cores, fuzzing included; docs/testing.md); test-slow: the
# fault-injection, kill-and-resume and warm-start runs and `serve deploy serve/config.yaml` (CI runs them too);
# test-cluster: the pipeline as a submitted Ray job, and serve/config.yaml deployed, each on a head of its own
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not cluster" $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not slow and not cluster" $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/labeling.py
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/kd_class_balance.py --base runs/office/seed0
	$(BIN)/python benchmarks/tune_compress.py
	$(BIN)/python benchmarks/compress.py 'compress.unit_keep=[0.75,0.5]' compress.latency_requests=300
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/warm_start.py
	$(BIN)/python benchmarks/reliability.py
	$(BIN)/python benchmarks/render.py

clean:
	rm -rf runs .pytest_cache
