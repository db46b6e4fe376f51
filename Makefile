# One command to a running server, one to a passing test suite:
#   make serve    set up .venv and serve the built-in demo model on http://127.0.0.1:8000
#   make test     set up .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch unless a CUDA driver is present (a plain `torch` would pull a CUDA build).
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/zerostart serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

bench: setup
	$(BIN)/zerostart bench load --cold $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
