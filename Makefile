# Two commands do all the set-up on a fresh machine:
#   make chat   create .venv, install rolechat, open a chat with the embedded model
#   make test   install what the tests need, run ruff, mypy and the whole pytest suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: chat test install dev bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "rolechat needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# llama-cpp-python has no wheel for this platform: it is built from source (about 5 minutes
# on 2 cores), once per CPU and set of build flags, and the wheel is kept in WHEELHOUSE. The
# build targets this CPU (llama.cpp's default), without the multimodal library, and on x86
# without AMX: its tile instructions fault where the kernel or a sandbox has not enabled them,
# and llama.cpp would use them on any CPU that advertises AMX. pip's own cache is not used for
# it, since pip would hand a wheel built for one CPU to another.
LLAMA_CPP   := llama-cpp-python==0.3.36
LLAMA_CMAKE := -DLLAVA_BUILD=OFF
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
CPU_KEY := $(shell (uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo; \
	echo '$(LLAMA_CPP) $(LLAMA_CMAKE) $(LLAMA_CFLAGS)'; \
	$(PYTHON) -c 'import sys; print(sys.version_info[:2])') 2>/dev/null | sha256sum | cut -c1-16)
WHEELHOUSE ?= $(HOME)/.cache/rolechat/wheels/$(CPU_KEY)

$(WHEELHOUSE)/.built: | $(BIN)/python
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" \
	    $(BIN)/pip wheel --progress-bar off --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python -w $(WHEELHOUSE) '$(LLAMA_CPP)'
	@touch $@

PIP_LLAMA := --find-links $(WHEELHOUSE) --only-binary llama-cpp-python

$(VENV)/.installed: pyproject.toml $(WHEELHOUSE)/.built | $(BIN)/python
	$(BIN)/pip install --progress-bar off --no-deps --force-reinstall $(PIP_LLAMA) '$(LLAMA_CPP)'
	$(BIN)/pip install --progress-bar off $(PIP_LLAMA) -e .
	@touch $@

# The tests also cover the transformers engine. TORCH names the PyTorch build to install first
# (2.13.0 is a CPU build on this kind of machine; plain `torch` can pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
# The web page's tests drive Debian's Chromium through Playwright (browsers are not downloaded
# by `playwright install`): install it when missing (needs root and apt).
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(BIN)/pip install --progress-bar off '$(TORCH)'
	$(BIN)/pip install --progress-bar off $(PIP_LLAMA) -e '.[dev,transformers]'
	@touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

chat: $(VENV)/.installed
	$(BIN)/rolechat chat $(ARGS)

# The tests run in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time: most
# of their time is spent waiting for a model, a server or a browser, so two overlap well even
# on two cores. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/multiturn.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
