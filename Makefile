# The two commands of the README: `make demo` and `make test`. Both set everything up first (tools/setup.sh:
# pip for torch, uv for the rest from the package index; docs/gpu.md).
# Set-up (tools/setup.sh) is idempotent: it reruns only when pyproject.toml, this file or tools/setup.sh change.
#
# torch is installed first and pinned, so that pip takes the right build for the machine: the CPU wheel
# here (torch==2.13.0). On a GPU cluster (docs/gpu.md), one of:
#   make setup TORCH_SPEC='torch==2.13.0' TORCH_INDEX_URL=<the CUDA wheel index of your CUDA version>
#   make setup TORCH_SPEC=system                  # keep the site's torch (its container or module)
#   make setup TORCH_SPEC=system WHEELHOUSE=DIR   # and no network: the wheels from `make wheelhouse`
# `make wheelhouse WHEELHOUSE=DIR [PY=3.12] [PLATFORM=manylinux_2_28_x86_64] [WHEELHOUSE_TORCH='torch==2.13.0']`
# writes those wheels on a machine that reaches the index (tools/wheelhouse.py).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
WHEELHOUSE ?=
EXTRAS ?= dev,parquet,hf
PY ?=
PLATFORM ?=
WHEELHOUSE_TORCH ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.parcae-setup-done
export DS_ACCELERATOR ?= cpu
# pytest-xdist workers: the tests wait on processes (ranks, daemons, servers) as much as they compute; a third
# worker fills the minutes when two wait (docs/testing.md)
TEST_WORKERS ?= 3

.PHONY: setup wheelhouse demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile tools/setup.sh
	PYTHON="$(PYTHON)" VENV="$(VENV)" TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX_URL="$(TORCH_INDEX_URL)" \
		WHEELHOUSE="$(WHEELHOUSE)" EXTRAS="$(EXTRAS)" tools/setup.sh
	touch $@

wheelhouse:
	$(MAKE) setup WHEELHOUSE=
	$(BIN)/python tools/wheelhouse.py "$(or $(WHEELHOUSE),wheelhouse)" --extras "$(EXTRAS)" \
		$(if $(PY),--python $(PY)) $(if $(PLATFORM),--platform $(PLATFORM)) \
		$(if $(WHEELHOUSE_TORCH),--torch "$(WHEELHOUSE_TORCH)") $(if $(TORCH_INDEX_URL),--torch-index-url $(TORCH_INDEX_URL))

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
