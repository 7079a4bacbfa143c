# pclite: `make run` starts the service, `make test` runs every test. Both install what is missing first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := qemu-system-x86 busybox-static linux-source-6.1 bc flex bison libelf-dev libssl-dev cpio \
                e2fsprogs postgresql gcc libc6-dev make xz-utils prometheus containerd runc \
                python3-seccomp

.PHONY: all deps venv kernel initramfs artifacts lab test test-host test-guest bench run lint clean
all: artifacts

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo -n "$$p "; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then echo "make: missing Debian packages: $$missing-- run 'sudo make deps'" >&2; exit 1; fi; \
	  echo "make: installing Debian packages: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: pclite needs Python >= 3.11 as python3" >&2; exit 1; }
	@echo "make: creating $(VENV) and installing pclite with its dev extras"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat  # a plain .pth: the import-hook finder costs start-up time
	@touch $@

# containerd starts the runtime 4x per container: a C quick path for start/delete, then a lean Python launcher.
$(VENV)/bin/pclite-runtime: $(STAMP) service/runtime/quickpath.c service/runtime/launcher.py
	@$(PY) -m service.runtime.launcher $@ >/dev/null

venv: $(STAMP) $(VENV)/bin/pclite-runtime

kernel: deps venv
	@$(PY) -m guestbuild.kernel build

initramfs: deps venv
	@$(PY) -m guestbuild.initramfs build

artifacts: kernel initramfs

lab: deps venv
	@$(VENV)/bin/pclite-lab check || true

test: artifacts test-host test-guest

test-host: venv
	$(PY) -m pytest -m "not guest" tests

# Guest tests boot real Linux: directly where this host's KVM can, otherwise all in one lab session.
test-guest: artifacts
	$(VENV)/bin/pclite-lab test -- tests

bench: artifacts
	$(VENV)/bin/pclite-lab run --if-needed -- $(PY) tests/bench/run_all.py

# pclited on this host (or inside the lab when this host's KVM cannot boot Linux), with a `default` pool of 2.
run: artifacts
	@$(PY) -m service.local_run

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf build .pytest_cache .ruff_cache
