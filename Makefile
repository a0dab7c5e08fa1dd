# Two commands do everything on a fresh clone with only Python 3.11+ and make:
#   make run   - a local development relay on 127.0.0.1:2465
#   make test  - format check, lint, type check and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/relay: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/relay
	$(BIN)/relay dev

test: $(BIN)/relay
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/ruff check relay tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(BIN)/relay
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
