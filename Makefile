# physmap-lab: `make demo` and `make test` work on a fresh machine; both run `setup` first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE := .cache
XEN_ROOT := $(CACHE)/xen-utils-4.17
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PHYSMAP_LAB_XEN_ROOT := $(abspath $(XEN_ROOT))

.PHONY: setup test unit demo bench lint fuzz soak clean image compose diff-c crash-states compiled test-pure bench-xenstored audit-hostile bytecode audit-migrate

setup: $(VENV)/.installed debian $(XEN_ROOT)/.unpacked compiled bytecode

# The packages' bytecode, written ahead as a non-editable install writes it: every process of
# the stack (a device model on each create and restore) then loads it instead of compiling
# every module from source, which is what happens under PYTHONDONTWRITEBYTECODE.  A no-op
# when up to date.
PACKAGES := xenhost xenstored_sim hypervisor_sim qemu_model toolstack physmap_lab
bytecode: $(VENV)/.installed
	@$(PY) -m compileall -q -j0 $(PACKAGES)

# The mypyc-compiled sans-IO core of xenstored-sim, in .cache/mypyc/<hash of its sources>
# (xenstored_sim/compiled.py); a no-op when up to date.  Without a build the pure core runs.
compiled: $(VENV)/.installed
	@$(PY) -c "import sys; from xenstored_sim.compiled import main; sys.exit(main(['build']))" || echo "xenstored-sim: using the pure-Python core"

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

# Both cores: the suite waits on real processes more than it computes.  A short base
# directory of its own keeps every socket path within sun_path's 107 bytes.
test: setup
	@base=$$(mktemp -d /tmp/plt.XXXXXX) && \
	$(PY) -m pytest -q -n 2 --basetemp=$$base/t && rm -rf $$base

# The fast ring alone: pure cores, no process or socket (markers set in tests/conftest.py).
unit: setup
	$(PY) -m pytest -q -m unit

# The unit ring of xenstored-sim on the pure-Python core (make test uses the compiled one).
test-pure: setup
	XENSTORED_SIM_PURE=1 $(PY) -m pytest -q tests/xenstored_sim/unit

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

# The xenstored-sim figures alone (closed loop, test-xenstore, CPU per op): a few minutes.
bench-xenstored: setup
	$(PY) bench/run.py --only throughput

fuzz: setup
	$(PY) -m physmap_lab.fuzz --frames 1000000

# The whole-stack random walk, long: `make soak SEED=7 STEPS=5000` replays one (no SEED: a new
# one, printed first).
SEED ?=
STEPS ?= 2000
soak: setup
	$(PY) -m physmap_lab.soak $(if $(SEED),--seed $(SEED)) --steps $(STEPS)

# Random differential run against C xenstored (../shared/oracle): make diff-c SEED="1 2" N=1000;
# ONLY=I reruns one scenario; AGAINST=c FRESH=1 is the self-check (C reused against C fresh).
N ?= 1000
diff-c: setup
	$(PY) tests/xenstored_sim/oracle/diffrun.py $(foreach s,$(or $(SEED),1),--seed $(s)) --n $(N) \
		$(if $(ONLY),--only $(ONLY)) $(if $(AGAINST),--against $(AGAINST)) $(if $(FRESH),--fresh)

# Every crash state of the durable store: the small workload under every --sync, the full one
# under always and batch, and a seeded sample of the full one's many states under none.
CRASH_TEST := tests/xenstored_sim/durability/test_crash_states.py
crash-states: setup
	XS_CRASH_WORKLOAD=small XS_CRASH_STATES=all $(PY) -m pytest -q -s $(CRASH_TEST) \
		-k every_crash_state
	XS_CRASH_WORKLOAD=full XS_CRASH_STATES=all $(PY) -m pytest -q -s $(CRASH_TEST) \
		-k "every_crash_state and not none"
	XS_CRASH_WORKLOAD=full XS_CRASH_STATES=400 $(PY) -m pytest -q -s $(CRASH_TEST) \
		-k "every_crash_state and none"

# The attack matrix of a compromised device model, every configuration (a few minutes).
audit-hostile: setup
	$(VENV)/bin/physmap-lab audit --hostile --out docs/audit

# Who touches the physmap keys on which host in a live migration, every mode x device, and the
# compat cells without the keys beside their save/restore twins (a few minutes).
audit-migrate: setup
	$(VENV)/bin/physmap-lab audit --migrate --out docs/audit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(CACHE) build *.egg-info
