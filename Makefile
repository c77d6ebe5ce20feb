# physmap-lab: `make demo` and `make test` work on a fresh machine; both run `setup` first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE := .cache
XEN_ROOT := $(CACHE)/xen-utils-4.17
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PHYSMAP_LAB_XEN_ROOT := $(abspath $(XEN_ROOT))

.PHONY: setup test demo bench lint fuzz clean image compose

setup: $(VENV)/.installed debian $(XEN_ROOT)/.unpacked

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# setuptools announces every editable install with an informational warning; quiet it.
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -e '.[test,dev]'
	@touch $@

# Debian's xenstore-utils gives the real libxenstore clients (xenstore-read, -write, -ls, ...);
# docker.io, docker-compose and debootstrap run the compose demo.
debian:
	@bash scripts/install-debian-packages.sh

# Xen's own test-xenstore ships in xen-utils-4.17: downloaded and unpacked here, never installed.
$(XEN_ROOT)/.unpacked: scripts/fetch-xen-utils.sh
	@bash scripts/fetch-xen-utils.sh $(XEN_ROOT)
	@touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/physmap-lab demo

# The compose image, built from a locally bootstrapped Debian with no registry: cached, and
# rebuilt only in the parts that changed (scripts/build-image.sh).
image: setup
	@bash scripts/build-image.sh $(PY)

# The demo under docker-compose, on two hosts, checked and torn down (scripts/compose-demo.sh).
compose: setup
	@bash scripts/compose-demo.sh $(PY)

bench: setup
	$(PY) bench/run.py

fuzz: setup
	$(PY) -m physmap_lab.fuzz --frames 1000000

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(CACHE) build *.egg-info
