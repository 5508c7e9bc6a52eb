VENV ?= .venv
export VENV

.PHONY: run test lint docs bench-density gpu-check

# Install into a local virtual environment and run the main job: the demo.
run:
	bash scripts/setup-venv.sh
	$(VENV)/bin/pyro-cwm demo --out runs/demo

# Install with the development tools and run the test suite and the linter.
test:
	bash scripts/setup-venv.sh dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -n 2 -q

lint:
	$(VENV)/bin/ruff check .

# Build the site into site/: the pages of docs/, the notebooks executed and rendered as
# tutorials (PYRO_CWM_FAST=1 for small settings), the API reference from the docstrings.
# Any warning (a docstring that does not parse, a link that does not resolve) fails it.
docs:
	bash scripts/setup-venv.sh dev
	PYRO_CWM_DOCS_EXECUTE=true NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench-density:
	bash scripts/setup-venv.sh dev
	$(VENV)/bin/python -m inference.bench.density

# On a CUDA machine: install, the CUDA tests and the GPU benchmarks within 8 minutes; the
# JSON report and the table go to bench-out/gpu-check (see scripts/gpu-check.sh --help).
gpu-check:
	bash scripts/gpu-check.sh --out bench-out/gpu-check
