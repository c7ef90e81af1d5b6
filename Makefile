# Quick start (README): `make run` runs the default job, `make test` runs the test suite.
# Each creates its own virtual environment on first use: torch==2.13.0 first (a local CPU wheel here;
# an unpinned torch would pull GBs of CUDA packages), then the project with pinned constraints.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
RUN_VENV ?= .venv
TEST_VENV ?= .venv-test
CONSTRAINTS := requirements/constraints.txt
PIP := --disable-pip-version-check --quiet
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test bench clean

run: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/agcpipe run

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -q

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python bench/bench_foundation.py

$(RUN_VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(call install,$(RUN_VENV),)

$(TEST_VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(call install,$(TEST_VENV),[test])

define install
	@echo "creating $(1) with $(PYTHON)"
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install $(PIP) --upgrade pip
	$(1)/bin/pip install $(PIP) torch==2.13.0
	$(1)/bin/pip install $(PIP) -c $(CONSTRAINTS) -e ".$(2)"
	touch $(1)/.installed
endef

clean:
	rm -rf $(RUN_VENV) $(TEST_VENV)
