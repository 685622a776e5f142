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

# llama-cpp-python has no wheel for this platform: pip builds it (a few minutes, once; pip
# caches the built wheel for every later install).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --progress-bar off -e .
	@touch $@

# The tests also cover the transformers engine. TORCH names the PyTorch build to install first
# (2.13.0 is a CPU build on this kind of machine; plain `torch` can pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
# The web page's tests drive Debian's Chromium through Playwright (browsers are not downloaded
# by `playwright install`): install it when missing (needs root and apt).
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(BIN)/pip install --progress-bar off '$(TORCH)'
	$(BIN)/pip install --progress-bar off -e '.[dev,transformers]'
	@touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

chat: $(VENV)/.installed
	$(BIN)/rolechat chat $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/multiturn.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
