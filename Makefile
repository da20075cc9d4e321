# Two commands on a fresh machine:  make demo  |  make test
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup demo test test-unit test-cluster clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup            ## set up, then run the demo job on a local Ray
	$(VENV)/bin/warden run jobs/demo.yaml

test: setup            ## set up, then run every test (unit + cluster); fails on any failure or on no tests
	$(VENV)/bin/pytest -q

test-unit: setup       ## unit tests only (no Ray), milliseconds each
	$(VENV)/bin/pytest -q tests/unit

test-cluster: setup    ## tests on one shared real Ray instance
	$(VENV)/bin/pytest -q tests/cluster

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
