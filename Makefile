# rallocator: `make demo` shows it working, `make test` proves it. Both install what they need.
PY      := /usr/bin/python3
VENV    := .venv
STAMP   := $(VENV)/.installed
RALLOC  := $(VENV)/bin/ralloc
PYTEST_ARGS ?=

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py rallocator/_atomic.c rallocator/_carver.c scripts/install-system-packages.sh
	sh scripts/install-system-packages.sh
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/python -m ralloc.demo

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/python -m bench.run_all

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
