# The two set-up commands of the README:
#   make run    create .venv if missing, install the package, run configs/tiny.py (ARGS="--config.x=y")
#   make test   the same with the test tools, then ruff and the test suite (what .ci/run does)
# Installs happen again only when pyproject.toml changes. google-jetstream is installed without its
# dependencies (seqio and TensorFlow, 1.9 GB that its Engine API never imports; README "Install").

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The one pin, read from pyproject.toml's `jetstream` extra.
JETSTREAM := $(shell sed -n 's/^jetstream = \["\(.*\)"\]$$/\1/p' pyproject.toml)
ARGS ?=

.PHONY: run test install install-test clean-venv

run: $(VENV)/.installed
	$(BIN)/python -m tapo_jax.main --config=configs/tiny.py $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/ruff check tapo_jax tests configs
	$(BIN)/ruff format --check tapo_jax tests configs
	$(BIN)/python -m pytest -q -n 3 --durations=25

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@test -n "$(JETSTREAM)" || { echo "error: no jetstream pin in pyproject.toml" >&2; exit 1; }
	$(BIN)/python -m pip install -q --no-warn-conflicts -e .
	$(BIN)/python -m pip install -q --no-deps "$(JETSTREAM)"
	touch $@

# --no-warn-conflicts: pip would otherwise list google-jetstream's dependencies, uninstalled by design.
# dashscope: one data file, Qwen's BPE ranks, from which tests build a real Qwen2 tokenizer offline.
# tpu: libtpu, which compiles TPU programs on this machine for tests/test_aot.py (no TPU needed).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-warn-conflicts -e ".[test,tpu]"
	$(BIN)/python -m pip install -q --no-deps dashscope==2.0.2
	touch $@

clean-venv:
	rm -rf $(VENV)
