# make demo   set up, then run the main recipe on the embedded default data
# make test   set up, then lint and run the whole test suite (what CI runs)
# make bench  set up, then print the speed benchmarks (installs the JAX peer into .venv-peers)
# make results  run every recipe's README experiment over its seeds (about an hour): docs/results.md + README table
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: help setup data demo demo-multiworker test lint bench results clean

help:
	@echo "make demo    set up (venv, requirements, Fashion-MNIST), then run python -m recipes.weight_transfer"
	@echo "make demo-multiworker  the same, --quick, as two local workers (MultiWorkerMirroredStrategy)"
	@echo "make test    set up, then ruff and the whole test suite (CI runs this via bash .ci/run)"
	@echo "make bench   set up, then run the speed benchmarks in tests/benchmarks/ (JAX peer in .venv-peers)"
	@echo "make results run every recipe's README experiment (about an hour): docs/results.md, README table"
	@echo "             (make results ARGS='--only maml_sinusoid' for some; ARGS='--render' only re-renders)"
	@echo "make setup   only the set-up; make lint: only ruff; make clean: remove runs/"

setup: $(VENV)/.installed data

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Fashion-MNIST, the default dataset: found locally, else Debian's dataset-fashion-mnist
# (where apt is usable), else the normal Keras download.
data: $(VENV)/.installed
	@$(PY) -c "import sys; from common.data import find_fashion_mnist as f; d = f(); print('Fashion-MNIST:', d); sys.exit(d is None)" \
	|| { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	     && { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	          || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; }; } \
	|| $(PY) -c "import keras; keras.datasets.fashion_mnist.load_data()"

demo: setup
	$(PY) -m recipes.weight_transfer

# Two workers on 127.0.0.1 (free ports, CPU), each with its TF_CONFIG; prints the chief's output.
demo-multiworker: setup
	$(PY) -m common.distributed --workers 2 --timeout 900 recipes.weight_transfer --quick

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest processes, one test file each at a time (module fixtures stay in one process): much of
# the suite is single-threaded (imports, tracing, subprocess start-up), so 2 cores run it in about
# 16 minutes instead of 22 (docs/timings_alone.md).
TEST_WORKERS ?= 2
test: setup lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The benchmarks' peers (JAX) live in their own virtualenv; the recipes and tests never need them.
PEERS_VENV ?= .venv-peers
$(PEERS_VENV)/.installed: tests/benchmarks/peers/requirements-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -r tests/benchmarks/peers/requirements-peers.txt
	touch $@

bench: setup $(PEERS_VENV)/.installed
	PEERS_PYTHON=$(CURDIR)/$(PEERS_VENV)/bin/python $(PY) -m tests.benchmarks.run_all

results: setup
	$(PY) -m tools.results $(ARGS)

clean:
	rm -rf runs .pytest_cache
