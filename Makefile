# The two commands a newcomer needs; each sets up what it needs (a .venv inside the project).
#   make train    train the lecture's BatchNorm MLP (pass flags with ARGS="--trainer.max_steps 20000")
#   make test     lint and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: a plain `torch` requirement pulls a multi-GB CUDA build. Override for your machine,
# e.g. make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0

.PHONY: train test lint setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train.py fit $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
