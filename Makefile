# The two commands of the README: `make demo` and `make test`. Both set everything up first.
# Set-up is idempotent: it reruns only when pyproject.toml or this file changes.
#
# torch is installed first and pinned, so that pip takes the right build for the machine:
# the CPU wheel here (torch==2.13.0); on a GPU cluster, e.g.
#   make setup TORCH_SPEC='torch==2.13.0' TORCH_INDEX_URL=<the CUDA wheel index of your CUDA version>

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.parcae-setup-done
export DS_ACCELERATOR ?= cpu
# pytest-xdist workers: the tests wait on processes (ranks, daemons, servers) as much as they compute
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		$(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check "setuptools>=64" wheel
	# DeepSpeed builds from source against the torch above (no isolated build env that could pull another torch).
	$(BIN)/pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[dev,parquet,hf]"
	$(BIN)/python -c "import torch, deepspeed, webdataset, sentencepiece, tensorboard, pydantic, boto3, transformers, lm_eval, xdist; \
		print('set-up ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
	touch $@

demo: setup
	$(BIN)/parcae demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# the inner loop: everything but the slow and multi-rank tests (docs/testing.md), about 2 minutes
test-fast: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not distributed"

clean:
	rm -rf $(VENV) .pytest_cache runs/demo-*
