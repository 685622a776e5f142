# Two commands do all the set-up on a fresh machine:
#   make chat   create .venv, install rolechat, open a chat with the embedded model
#   make test   install what the tests need, run ruff, mypy and the whole pytest suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=
comma  := ,

.PHONY: chat test install dev bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "rolechat needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# llama-cpp-python has no wheel for this platform: it is built from source (about 4 minutes
# on 2 cores), once per CPU and set of build flags, and the wheel is kept in WHEELHOUSE. The
# build targets this CPU (llama.cpp's default); it leaves out the multimodal library and
# llama.cpp's "common" library (tools/llama-cpp-lean.cmake), which the Python package never
# loads; and on x86 it leaves out AMX: its tile instructions fault where the kernel or a sandbox
# has not enabled them, and llama.cpp would use them on any CPU that advertises AMX. pip's own
# cache is not used for it, since pip would hand a wheel built for one CPU to another.
LLAMA_CPP   := llama-cpp-python==0.3.36
LLAMA_CMAKE := -DLLAVA_BUILD=OFF
LLAMA_LEAN  := tools/llama-cpp-lean.cmake
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
CPU_KEY := $(shell (uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo; \
	echo '$(LLAMA_CPP) $(LLAMA_CMAKE) $(LLAMA_CFLAGS)'; cat $(LLAMA_LEAN); \
	$(PYTHON) -c 'import sys; print(sys.version_info[:2])') 2>/dev/null | sha256sum | cut -c1-16)
WHEELHOUSE ?= $(HOME)/.cache/rolechat/wheels/$(CPU_KEY)

$(WHEELHOUSE)/.built: | $(BIN)/python
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE) -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/$(LLAMA_LEAN)" \
	    CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" \
	    $(BIN)/pip wheel --progress-bar off --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python -w $(WHEELHOUSE) '$(LLAMA_CPP)'
	@touch $@

PIP_LLAMA := --find-links $(WHEELHOUSE) --only-binary llama-cpp-python
PIP       := $(BIN)/pip install --progress-bar off
# $(call install-rolechat,EXTRAS): the built wheel, then rolechat with EXTRAS (pip checks all).
install-rolechat = $(PIP) --no-deps --force-reinstall $(PIP_LLAMA) '$(LLAMA_CPP)' && \
	$(PIP) $(PIP_LLAMA) -e '.$(1)'

# While that wheel builds, everything else is installed beside it (make -j): the requirements
# that don't need llama-cpp-python, listed by tools/requirements.py. Once both are done, the
# wheel and rolechat itself go in, and pip checks that nothing is missing. The stamps depend on
# the Makefile, which holds the build flags.
$(VENV)/.deps: pyproject.toml tools/requirements.py | $(BIN)/python
	$(BIN)/python tools/requirements.py > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt
	@touch $@

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(MAKE) --no-print-directory -j2 $(WHEELHOUSE)/.built $(VENV)/.deps
	$(call install-rolechat,)
	@touch $@

# The tests also cover the transformers engine. TORCH names the PyTorch build to install
# (2.13.0 is a CPU build on this kind of machine; plain `torch` can pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0

$(VENV)/.deps-dev: pyproject.toml tools/requirements.py $(VENV)/.deps
	$(BIN)/python tools/requirements.py dev transformers > $(VENV)/requirements-dev.txt
	$(PIP) '$(TORCH)' -r $(VENV)/requirements-dev.txt
	@touch $@

# The web page's tests drive Debian's Chromium through Playwright (browsers are not downloaded
# by `playwright install`): installed when missing (needs root and apt), beside the rest.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

$(VENV)/.installed-dev: pyproject.toml Makefile | $(BIN)/python
	$(MAKE) --no-print-directory -j3 $(WHEELHOUSE)/.built $(VENV)/.deps-dev chromium
	$(call install-rolechat,[dev$(comma)transformers])
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

chat: $(VENV)/.installed
	$(BIN)/rolechat chat $(ARGS)

# The tests run in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time: most
# of their time is spent waiting for a model, a server or a browser, so two overlap well even
# on two cores. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/multiturn.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
