# Two commands do everything on a fresh clone with only Python 3.11+ and make:
#   make run   - a local development relay on 127.0.0.1:2465
#   make test  - format check, lint, type check, the docs build and the whole test suite
# and, not part of `make test`:
#   make mutation - mutation testing of the pure core (about 15 minutes on 2 cores;
#                   docs/design.md, "Mutation testing")
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench mutation clean

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
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site
	$(BIN)/python -m pytest

bench: $(BIN)/relay
	$(BIN)/python -m bench

# mutmut rather than cosmic-ray: mutmut 3 forks each mutant from one process
# that has the tests imported and runs only the tests that reach the mutated
# function (a run takes about 15 minutes on 2 cores); cosmic-ray starts the
# whole test command per mutant. Its config is [tool.mutmut] in
# pyproject.toml; a fresh mutants/ each run, so no stale result is counted.
# PATH: mutmut runs the mypy of its type_check_command by name.
mutation: $(BIN)/relay
	rm -rf mutants
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mutmut run --max-children 2
	$(BIN)/python tests/mutation.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants site
