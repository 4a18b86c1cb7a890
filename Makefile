# The two commands of the README:
#   make demo   - set up everything, run a local broker night on generated (and, when present, real) alerts, print the status
#   make test   - set up everything, run the whole test suite (this is what .ci/run calls)
# Set-up is idempotent: a virtual environment in .venv, re-installed when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test unit bench install clean down

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pgbctl.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python -m bench

down:
	-$(BIN)/pgbctl local down

clean: down
	rm -rf .pgbctl
