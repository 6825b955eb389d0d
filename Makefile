# The two commands a newcomer needs; each sets up what it needs (a .venv inside the project).
#   make train        train the lecture's BatchNorm MLP (pass flags with ARGS="--trainer.max_steps 20000")
#   make test         lint and run the test suite
#   make tensorboard  serve lightning_logs/ at http://localhost:6006 (ARGS="--port 6007" to change)
#   make docs         build the documentation site (mkdocs --strict) into build/site/
#   make test-lowest  the test suite on the lowest Lightning pyproject.toml allows, in .venv-lowest/
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned. Which build `torch==2.13.0` is depends on the index: from PyPI on Linux x86-64 it is the
# CUDA build (several GB of NVIDIA libraries), on macOS and Windows the CPU one. Choose yours, e.g.
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
# the floor of `lightning` in pyproject.toml, read from it; old Lightning imports pkg_resources (setuptools < 81)
LOWEST_VENV := .venv-lowest
LOWEST ?= $(shell sed -n 's/^ *"lightning>=\([0-9.]*\).*/lightning==\1/p' pyproject.toml) setuptools<81

.PHONY: train test lint setup clean tensorboard test-lowest docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train.py fit $(ARGS)

tensorboard: $(VENV)/.installed
	@port=$$(printf '%s\n' "$(ARGS)" | sed -n 's/.*--port[= ]*\([0-9][0-9]*\).*/\1/p'); \
	host=$$(printf '%s\n' "$(ARGS)" | sed -n 's/.*--host[= ]*\([^ ]*\).*/\1/p'); \
	echo "Training-health dashboard (Custom Scalars): http://$${host:-localhost}:$${port:-6006}/#custom_scalars"
	$(VENV)/bin/tensorboard --logdir lightning_logs $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# the site of docs/ and mkdocs.yml; --strict: a broken link, anchor, API reference or a page left out of the nav
# fails. tests/test_docs.py runs the same build, so `make test` covers it. NO_MKDOCS_2_WARNING: Material's banner.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# the same torch, the lowest Lightning, everything else as the resolver picks it; the dev extras only (the
# integration tests with transformers, W&B and MLflow skip without them)
$(LOWEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install -q $(TORCH)
	$(LOWEST_VENV)/bin/python -m pip install -q $(foreach p,$(LOWEST),"$(p)") -e ".[dev]"
	touch $@

# what depends on Lightning's behaviour: fit, resume, predict, validate/test through train.py, DDP, the module,
# the data module, the fast path, and the monitors (cadence, resume, groups, DDP, compile, manual optimization)
LOWEST_TESTS := tests/test_train_cli.py tests/test_cli.py tests/test_ddp.py tests/test_module.py tests/test_data.py \
	tests/test_fastpath.py tests/test_callbacks.py tests/test_callbacks_cadence.py tests/test_callbacks_group.py \
	tests/test_callbacks_ddp.py tests/test_callbacks_setups.py tests/test_hook_skipping.py tests/test_health.py \
	tests/test_recorder.py tests/test_health_monitor.py tests/test_memory.py tests/test_console.py

test-lowest: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -c "import lightning; print('lightning', lightning.__version__)"
	$(LOWEST_VENV)/bin/python -m pytest -q $(wildcard $(LOWEST_TESTS))

clean:
	rm -rf $(VENV) $(LOWEST_VENV) lightning_logs .pytest_cache
