# mtad developer entry points.
#   make setup         system packages (only the missing ones) + .venv with mtad and its test extras
#   make run           start the embedded PostgreSQL, migrate, ensure a demo tenant, run the daemon
#   make test          the whole suite (it starts its own PostgreSQL)
#   make bench-submit  the submission benchmark (BENCH_ARGS=...)
#   make clean         stop the embedded cluster, remove .venv and var/

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config/mtad.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=

MTAD := $(VENV)/bin/mtad --config $(CONFIG)
# Reinstalls only when pyproject.toml is newer than this stamp (or the venv is gone).
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run test bench-submit clean

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

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench-submit: $(STAMP)
	$(VENV)/bin/python benchmarks/submit.py $(BENCH_ARGS)

# A cluster that had to live outside var/ (see mtad/db/embedded.py) is named by a cluster-home
# pointer file; remove it too, but only if it has the shape embedded.py gives such directories.
clean:
	-@if [ -x $(VENV)/bin/mtad ]; then $(MTAD) db stop; fi
	@for pointer in $$(find var -name cluster-home 2>/dev/null); do \
		home=$$(cat "$$pointer"); \
		case "$$home" in /var/lib/mtad/pg-*|/*/mtad-[0-9]*/pg-*) rm -rf "$$home" ;; esac; \
	done
	rm -rf $(VENV) var
