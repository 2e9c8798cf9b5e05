# Two entry points that work on a fresh Debian machine as root:
#   make demo   set everything up and run the main job
#   make test   set everything up and run ruff, mypy --strict and the whole test suite
# Both install what they need themselves (apt packages, a virtualenv, the package).

SHELL := /bin/bash
# Debian's own interpreter when there is one: the one real users have, and one every Unix
# user may run (the multi-user mount's users call the venv's envfs). An interpreter under
# root's home (a pyenv on PATH) would shut them out. PYTHON=... overrides.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
# systemd-container: systemd-nspawn, for tests/integration/test_systemd_container.py
APT_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc rsync sqlite3 git \
                util-linux passwd gocryptfs acl systemd-container patch


.PHONY: FORCE setup system-deps venv demo test lint typecheck pytest bench bench-fs clean

setup: system-deps venv

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "envfs: error: missing apt packages:$$missing (run as root, or install them)"; exit 1; fi; \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# A venv made by another interpreter than PYTHON is made again.
$(BIN)/python: FORCE
	@if [ -x $(BIN)/python ] && [ "$$($(BIN)/python -c 'import sys; print(sys._base_executable)')" \
	      -ef "$$($(PYTHON) -c 'import sys; print(sys.executable)')" ]; then :; else \
	  echo "making $(VENV) with $(PYTHON)"; rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi

FORCE:

# pyfuse3 first, built with envfs's patches (scripts/pyfuse3/, applied by scripts/build_pyfuse3.py); envfs's
# requirement on pyfuse3 is then already met and pip keeps that build.
$(VENV)/.installed: $(BIN)/python pyproject.toml scripts/build_pyfuse3.py \
                     $(wildcard scripts/pyfuse3/*.patch)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python scripts/build_pyfuse3.py
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check envfs tests bench scripts
	$(BIN)/ruff format --check envfs tests bench scripts

typecheck: setup
	$(BIN)/mypy --strict envfs

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: setup
	$(BIN)/python bench/kms_bench.py

# envfs beside gocryptfs on the same disk (root; about 10 minutes). BENCH_ARGS="--reps 5"
bench-fs: setup
	bash bench/fs.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
