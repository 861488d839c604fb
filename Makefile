# `make test` creates (or reuses) .venv, installs the CPU build of torch and the package with its
# dev extras, then runs ruff and pytest. The torch pin keeps pip on the CPU wheel on CPU-only
# machines; the package metadata itself keeps a normal range for users.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-deepspeed lint bench shipped-base clean

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

# Retrain the base the package ships (src/cmlora/synth/shipped_base) on the default suite, from scratch: after
# any change to the suite generator or to the recipe (RECIPE_VERSION). About 12 minutes on 2 CPU cores.
SHIP := runs/shipped-base
shipped-base: $(STAMP)
	$(BIN)/cmlora synth --out $(SHIP)/suite --seed 0
	CMLORA_CACHE=$(SHIP)/cache $(BIN)/cmlora pretrain-base --suite $(SHIP)/suite --out $(SHIP)/base --seed 0 --no-cache
	$(BIN)/python -m cmlora.synth.shipped $(SHIP)/base --command "cmlora synth --out suite --seed 0" \
		--command "cmlora pretrain-base --suite suite --out base --seed 0 --no-cache"

clean:
	rm -rf $(VENV) build dist src/*.egg-info
