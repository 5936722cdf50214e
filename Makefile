# `make demo`: set up the environment and run the demo. `make test`: set up and run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.po-batch-installed

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/po-batch demo demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf demo .pytest_cache
