# `make help` lists the targets. Every target creates the virtualenv first when it is missing,
# and accepts one made by hand as the README's Install section does (same packages).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
EXTRAS ?= test,hf,eval,mpi
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: help install test demo lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 10

# The marker is (re)made when setup.py or pyproject.toml change. An environment installed by hand
# is kept: torch is installed only when missing (pinned: an unpinned torch would pull a multi-GB
# CUDA build), and pip leaves satisfied requirements alone.
$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
		( $(PY) -m pip install --upgrade pip && $(PY) -m pip install torch==$(TORCH_VERSION) )
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed  ## create .venv: CPU torch (pinned), then the package with its test,hf,eval,mpi extras

test: $(VENV)/.installed  ## run the test suite (what CI runs); PYTEST_ARGS="..." for a subset
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed  ## the whole pipeline on CPU, about 5 minutes on 2 cores (demo/demo.yaml; DEMO_ARGS="key=value")
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) demo/demo.py $(DEMO_ARGS)

lint: $(VENV)/.installed  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed  ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed  ## MoE layer and pretraining throughput, side by side (bench/README.md has the rest)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) bench/moe_layer.py
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) bench/pretrain_throughput.py --steps 60

clean:  ## remove .venv and build outputs (runs/ and data/ are kept)
	rm -rf $(VENV) build *.egg-info .pytest_cache
