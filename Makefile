# Two commands do everything on a fresh machine with Python >= 3.10:
#   make train   -> creates .venv, installs, trains FHME on the bundled Tiny Shakespeare
#   make test    -> creates .venv, installs, runs the test suite
# TORCH picks the torch requirement; the default pins the CPU wheel this project is tested with.
# Elsewhere: make test TORCH="torch>=2.4"
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/fractalmoe train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest -m slow
	$(BIN)/fractalmoe bench layer

clean:
	rm -rf $(VENV) runs
