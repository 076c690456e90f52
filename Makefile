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

.PHONY: install install-dev system-packages viewers ohif triton-server run test test-unit lint bench engines clean

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

# OHIF's published static build (@ohif/app's dist/), which tests/test_ohif.py serves to headless
# Chromium pointed at a node's /dicomweb: the npm registry's tarball at the pinned version,
# checked against the integrity pinned with it (`npm view @ohif/app@VERSION dist.integrity`),
# unpacked once and again only when the pin changes. Without npm the test skips on a
# workstation and fails under CI, as the viewer tests do.
OHIF_VERSION := 3.13.2
OHIF_INTEGRITY := sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
OHIF := $(VIEWERS)/ohif
ohif: $(OHIF)/.installed-$(OHIF_VERSION)

$(OHIF)/.installed-$(OHIF_VERSION):
	@if command -v npm >/dev/null; then \
	  set -e; rm -rf $(OHIF); mkdir -p $(OHIF); \
	  npm pack @ohif/app@$(OHIF_VERSION) --pack-destination $(OHIF) --silent >/dev/null; \
	  tarball=$(OHIF)/ohif-app-$(OHIF_VERSION).tgz; \
	  got=$$(node -e 'const f=require("fs"),c=require("crypto");console.log("sha512-"+c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' $$tarball); \
	  if [ "$$got" != "$(OHIF_INTEGRITY)" ]; then echo "$$tarball: integrity $$got, not the pinned $(OHIF_INTEGRITY)"; rm -f $$tarball; exit 1; fi; \
	  tar xzf $$tarball -C $(OHIF) --strip-components=1 package/dist; \
	  rm $$tarball; touch $@; \
	else \
	  echo "npm not found: the OHIF test (tests/test_ohif.py) cannot run"; \
	fi

# NVIDIA Triton Inference Server for tests/test_triton.py and benchmarks/triton.py: the
# `tritonserver` (2.51, CPU, Python backend only) that the nvidia-pytriton wheel ships, in a
# venv of its own (the wheel pins numpy<2, which .venv must not get). The backend's stub
# embeds the system's libpython3.11, so the venv is made from that Python, and the stub
# finds the venv's onnxruntime and numpy through the `python3` first on PATH (the tests
# put .venv-triton/bin there).
TRITON_VENV := .venv-triton
TRITON_DIST := $(TRITON_VENV)/lib/python3.11/site-packages/pytriton/tritonserver
triton-server: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed:
	/usr/bin/python3.11 -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q nvidia-pytriton onnxruntime
	cp $(TRITON_DIST)/python_backend_stubs/3.11/triton_python_backend_stub $(TRITON_DIST)/backends/python/
	touch $@

# `test` runs every test: the unit tests and the integration ones (real DCMTK, Orthanc,
# dciodvfy, `cadnode serve`, chromium; tests/conftest.py says which). `test-unit` runs the unit
# tests alone, in about a minute: the loop while editing. `test` runs in TEST_WORKERS
# pytest-xdist workers, each taking whole files (their module fixtures start once); most tests
# wait on peers and subprocesses, so two workers keep two cores busy where one left them half
# idle.
TEST_WORKERS ?= 2
test: install-dev viewers ohif triton-server
	$(BIN)/ruff check cadnode training tests benchmarks
	$(BIN)/mypy cadnode
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-unit: install-dev
	$(BIN)/ruff check cadnode training tests benchmarks
	$(BIN)/mypy cadnode
	$(BIN)/pytest -q -m "not integration"

# Every benchmark script in benchmarks/, one after the other; each prints its own figures.
bench: install-dev triton-server
	@for script in benchmarks/*.py; do \
	  [ "$$(basename $$script)" = __init__.py ] && continue; \
	  echo "== $$script"; $(BIN)/python $$script || exit 1; \
	done

# The segmenter measures its cascade with the rule-out bundle, so that one is built first.
engines: install-dev
	$(BIN)/cadnode-train build ruleout --config training/configs/ruleout.yaml --out engines/cxr-ruleout
	$(BIN)/cadnode-train build segmenter --config training/configs/segmenter.yaml --out engines/cxr-segmenter
	$(BIN)/cadnode-train build dbt --config training/configs/dbt.yaml --out engines/dbt-detector
	$(BIN)/cadnode-train build findings --config training/configs/findings.yaml --out engines/cxr-findings

clean:
	rm -rf $(VENV) $(TRITON_VENV) var .pytest_cache .mypy_cache .ruff_cache
