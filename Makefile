# cadnode: `make run` serves the embedded default, `make test` runs the whole suite.
# Every target installs what it needs first; installing twice changes nothing.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := dcmtk orthanc orthanc-dicomweb dicom3tools chromium chromium-driver postgresql
# Debian's Orthanc package tries to start its own service on install; we only want the binary.
APT := DEBIAN_FRONTEND=noninteractive apt-get
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-dev system-packages viewers run test test-unit lint bench engines clean

install: system-packages $(VENV)/.installed-core

install-dev: system-packages $(VENV)/.installed-dev

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) $(APT) update -qq && $(SUDO) $(APT) install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-core: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $@

# torch is pinned to the CPU build that lies on disk (see pyproject's `train` extra).
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(VENV)/.installed-core $@

run: install
	$(BIN)/cadnode serve

# The Node.js viewer harness (tests/viewers/: cornerstone3D's SEG adapter and dcmjs, as OHIF
# runs them), exactly as its package-lock.json pins it; installed again only when the lock
# changes. No install scripts run: none of its packages needs one. Without npm the viewer
# tests skip on a workstation and fail under CI.
VIEWERS := tests/viewers
viewers: $(VIEWERS)/node_modules/.package-lock.json

$(VIEWERS)/node_modules/.package-lock.json: $(VIEWERS)/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix $(VIEWERS) --no-audit --no-fund --ignore-scripts && touch $@; \
	else \
	  echo "npm not found: the viewer tests (tests/test_viewers_*.py) cannot run"; \
	fi

# `test` runs every test: the unit tests and the integration ones (real DCMTK, Orthanc,
# dciodvfy, `cadnode serve`, chromium; tests/conftest.py says which). `test-unit` runs the unit
# tests alone, in about a minute: the loop while editing.
test: install-dev viewers
	$(BIN)/ruff check cadnode training tests benchmarks
	$(BIN)/mypy cadnode
	$(BIN)/pytest -q

test-unit: install-dev
	$(BIN)/ruff check cadnode training tests benchmarks
	$(BIN)/mypy cadnode
	$(BIN)/pytest -q -m "not integration"

# Every benchmark script in benchmarks/, one after the other; each prints its own figures.
bench: install-dev
	@for script in benchmarks/*.py; do \
	  [ "$$(basename $$script)" = __init__.py ] && continue; \
	  echo "== $$script"; $(BIN)/python $$script || exit 1; \
	done

# The segmenter measures its cascade with the rule-out bundle, so that one is built first.
engines: install-dev
	$(BIN)/cadnode-train build ruleout --config training/configs/ruleout.yaml --out engines/cxr-ruleout
	$(BIN)/cadnode-train build segmenter --config training/configs/segmenter.yaml --out engines/cxr-segmenter
	$(BIN)/cadnode-train build dbt --config training/configs/dbt.yaml --out engines/dbt-detector

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
