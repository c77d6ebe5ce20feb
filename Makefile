# physmap-lab: `make demo` and `make test` work on a fresh machine; both run `setup` first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE := .cache
XEN_ROOT := $(CACHE)/xen-utils-4.17
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PHYSMAP_LAB_XEN_ROOT := $(abspath $(XEN_ROOT))

.PHONY: setup compiled test test-pure demo bench bench-xenstored lint fuzz clean

setup: $(VENV)/.installed debian $(XEN_ROOT)/.unpacked compiled

# The mypyc-compiled sans-IO core of xenstored-sim, in .cache/mypyc/<hash of its sources>
# (xenstored_sim/compiled.py); a no-op when up to date.  Without a build the pure core runs.
compiled: $(VENV)/.installed
	@$(PY) -c "import sys; from xenstored_sim.compiled import main; sys.exit(main(['build']))" || echo "xenstored-sim: using the pure-Python core"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	@touch $@

# Debian's xenstore-utils gives the real libxenstore clients (xenstore-read, -write, -ls, ...).
debian:
	@bash scripts/install-debian-packages.sh

# Xen's own test-xenstore ships in xen-utils-4.17: downloaded and unpacked here, never installed.
$(XEN_ROOT)/.unpacked: scripts/fetch-xen-utils.sh
	@bash scripts/fetch-xen-utils.sh $(XEN_ROOT)
	@touch $@

test: setup
	$(PY) -m pytest -q

# The unit ring of xenstored-sim on the pure-Python core (make test uses the compiled one).
test-pure: setup
	XENSTORED_SIM_PURE=1 $(PY) -m pytest -q tests/xenstored_sim/unit

demo: setup
	$(VENV)/bin/physmap-lab demo

bench: setup
	$(PY) bench/run.py

# The xenstored-sim figures alone (closed loop, test-xenstore, CPU per op): a few minutes.
bench-xenstored: setup
	$(PY) bench/run.py --only throughput

fuzz: setup
	$(PY) -m physmap_lab.fuzz --frames 1000000

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(CACHE) build *.egg-info
