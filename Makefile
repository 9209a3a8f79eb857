# Set-up and everyday targets. `make demo` and `make test` are the only set-up a fresh machine needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.gcinfer-installed
CACHE ?= .cache
TEST_WORKERS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint bench gpu-check fixtures container-test clean

install: $(STAMP)

$(STAMP): shared/pyproject.toml devtools/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -e shared -e devtools
	touch $(STAMP)

fixtures: install
	$(VENV)/bin/gcinfer make-fixtures $(CACHE)/fixtures --seed 0

demo: fixtures
	$(PY) -m gcinfer_dev.demo --fixtures $(CACHE)/fixtures --output demo_output

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile tests

container-test: fixtures
	containers/container-test.sh --fixtures $(CACHE)/fixtures

bench: fixtures
	$(PY) benchmarks/run_all.py --fixtures $(CACHE)/fixtures

gpu-check: fixtures
	$(PY) benchmarks/gpu_check.py --fixtures $(CACHE)/fixtures

clean:
	rm -rf $(CACHE) demo_output dist
