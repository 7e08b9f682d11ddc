# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
# pytest workers for `make test`. Most tests keep one core busy, so two workers use a 2-core
# machine; each file stays on one worker (--dist loadfile) so that its module fixtures (an
# export, a trained student) are built once.
TEST_WORKERS ?= 2

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	DEMO_OUT=$(DEMO_OUT) PY=$(PY) bash scripts/demo.sh

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache build dist src/*.egg-info
