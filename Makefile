# mtad developer entry points.
#   make setup         system packages (only the missing ones) + .venv with mtad and its test extras
#   make run           start the embedded PostgreSQL, migrate, ensure a demo tenant, run the daemon
#   make test          the whole suite (it starts its own PostgreSQL)
#   make bench-submit  the submission benchmark (BENCH_ARGS=...)
#   make bench         mtad against Postfix, paired relay benchmark (BENCH_ARGS=...)
#   make clean         stop the embedded cluster, remove .venv and var/

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config/mtad.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=

MTAD := $(VENV)/bin/mtad --config $(CONFIG)
# Reinstalls only when pyproject.toml is newer than this stamp (or the venv is gone).
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run test bench-submit bench clean install

setup: system-deps $(STAMP)

system-deps:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $@

run: setup
	$(MTAD) db start
	$(MTAD) migrate
	$(MTAD) tenant demo
	exec $(MTAD) run

demo: setup
	$(VENV)/bin/mtad --config $(CONFIG) demo

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench-submit: $(STAMP)
	$(VENV)/bin/python benchmarks/submit.py $(BENCH_ARGS)

# The paired relay benchmark, mtad against a private Postfix (benchmarks/README.md); as root.
bench: $(STAMP)
	$(VENV)/bin/python benchmarks/relay.py $(BENCH_ARGS)

# A cluster that had to live outside var/ (see mtad/db/embedded.py) is named by a cluster-home
# pointer file; remove it too, but only if it has the shape embedded.py gives such directories.
clean:
	-@if [ -x $(VENV)/bin/mtad ]; then $(MTAD) db stop; fi
	@for pointer in $$(find var -name cluster-home 2>/dev/null); do \
		home=$$(cat "$$pointer"); \
		case "$$home" in /var/lib/mtad/pg-*|/*/mtad-[0-9]*/pg-*) rm -rf "$$home" ;; esac; \
	done
	rm -rf $(VENV) var

# make install (as root): mtad as a systemd service (see systemd/README.md). A venv with mtad built from this
# checkout in $(PREFIX)/venv; the mtad system user; config files in /etc/mtad (only those not there yet, an
# operator's edits are kept); the unit in /etc/systemd/system. It neither enables nor starts the service.
# The service's venv is built on the system Python: the unit hides /root and /home (ProtectHome=yes), so a
# Python from pyenv or ~/.local would not start.
PREFIX ?= /opt/mtad
SERVICE_PYTHON ?= /usr/bin/python3
ETC := /etc/mtad
UNIT := /etc/systemd/system/mtad.service

install:
	@test "$$(id -u)" -eq 0 || { echo "make install: run as root" >&2; exit 1; }
	@test -x $(PREFIX)/venv/bin/python || $(SERVICE_PYTHON) -m venv $(PREFIX)/venv
	@case "$$(readlink -f $(PREFIX)/venv/bin/python)" in /root/*|/home/*) \
		echo "make install: $(PREFIX)/venv runs a Python under /root or /home, hidden from the service" \
			"(ProtectHome=yes); remove $(PREFIX)/venv and set SERVICE_PYTHON" >&2; exit 1;; esac
	$(PREFIX)/venv/bin/python -m pip install -q --upgrade --no-warn-script-location .
	@if command -v systemd-sysusers >/dev/null 2>&1; then \
		install -D -m 0644 systemd/mtad.sysusers.conf /etc/sysusers.d/mtad.conf && \
		systemd-sysusers /etc/sysusers.d/mtad.conf; \
	elif ! getent passwd mtad >/dev/null; then \
		useradd --system --user-group --home-dir /var/lib/mtad --no-create-home --shell /usr/sbin/nologin mtad; \
	fi
	install -d -m 0750 -o root -g mtad $(ETC)
	@for pair in mtad.example.toml:mtad.toml shaping.toml:shaping.toml bounce_rules.toml:bounce_rules.toml; do \
		src=config/$${pair%%:*}; dst=$(ETC)/$${pair##*:}; \
		if [ -e "$$dst" ]; then echo "kept $$dst"; \
		else install -m 0640 -o root -g mtad "$$src" "$$dst" && echo "installed $$dst"; fi; \
	done
	sed 's|/opt/mtad/|$(PREFIX)/|g' systemd/mtad.service > $(UNIT).tmp
	chmod 0644 $(UNIT).tmp && mv $(UNIT).tmp $(UNIT)
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "next: edit $(ETC)/mtad.toml, write $(ETC)/db-password, migrate, systemctl enable --now mtad"
	@echo "      (systemd/README.md)"
