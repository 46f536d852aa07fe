# Everything a fresh machine needs goes through these targets; each creates the virtual
# environment it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: test lint typecheck check demo bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "podsettle needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The main job on the embedded default: the sandbox of both services and a SQLite event log.
demo: $(STAMP)
	$(VENV)/bin/podsettle demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py $(if $(BEFORE),--before $(BEFORE))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy sees the installed layout (podsettle.domain, ...) through a tree of links to the sources.
typecheck: $(STAMP)
	@rm -rf .typecheck && mkdir -p .typecheck
	@cp -rs $(CURDIR)/podsettle .typecheck/podsettle
	@for d in domain adapters sandbox projections replay; do ln -s $(CURDIR)/$$d .typecheck/podsettle/$$d; done
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p podsettle

check: lint typecheck test

clean:
	rm -rf $(VENV) .typecheck build *.egg-info .pytest_cache .mypy_cache .hypothesis
