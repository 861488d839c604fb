# `make test` creates (or reuses) .venv, installs the CPU build of torch and the package with its
# dev extras, then runs ruff and pytest. The torch pin keeps pip on the CPU wheel on CPU-only
# machines; the package metadata itself keeps a normal range for users.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-deepspeed lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests tests_deepspeed benchmarks

test: lint
	$(BIN)/python -m pytest -q

# DeepSpeed ZeRO-2/ZeRO-3 on 2 CPU processes (installs deepspeed into .venv; ops compile on first use).
test-deepspeed: $(STAMP)
	$(BIN)/python -m pip install --quiet "deepspeed>=0.15" "$(TORCH_SPEC)"
	$(BIN)/python -m pytest -q tests_deepspeed

bench: $(STAMP)
	$(BIN)/python benchmarks/layer.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
