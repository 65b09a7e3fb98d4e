# Two commands a newcomer needs: `make demo` (train the demo) and `make test` (the whole suite).
# Both create .venv on first use and install irra_dist into it with the deepspeed, serve and dev extras.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned to the pair that installs from the local wheel cache here (see docs)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean-venv

$(BIN)/activate-irra: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[deepspeed,serve,dev]"
	touch $@

demo: $(BIN)/activate-irra
	$(BIN)/accelerate launch launch/train.py

test: $(BIN)/activate-irra
	$(BIN)/python -m pytest tests

lint: $(BIN)/activate-irra
	$(BIN)/ruff check .

bench: $(BIN)/activate-irra
	$(BIN)/python bench/run_all.py

clean-venv:
	rm -rf $(VENV)
