# Two commands on a fresh machine:  make demo  |  make test
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# The npm MCP servers (the reference filesystem server), pinned with their dependencies by
# mcp-servers/package-lock.json and installed with npm ci into mcp-servers/node_modules (gitignored).
MCP_DIR = mcp-servers
# Debian packages the sandboxes need: bubblewrap (bwrap), runsc (gVisor), util-linux (prlimit); and what builds
# runtime._hmac (native/hmac.c): gcc, the OpenSSL and Python headers.
SYSTEM_PACKAGES = bubblewrap runsc util-linux gcc libssl-dev python3-dev
HAVE_BUILD = command -v cc >/dev/null && printf '\043include <openssl/sha.h>\n\043include <Python.h>\n' | \
	cc -E -I"$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" - >/dev/null 2>&1

.PHONY: setup system-deps demo test test-unit test-sandbox test-cluster redteam mutate clean

setup: system-deps $(STAMP) $(MCP_DIR)/.installed

system-deps:           ## install the sandbox runtimes and build tools with apt-get when they are missing (needs root)
	@if command -v bwrap >/dev/null && command -v runsc >/dev/null && command -v prlimit >/dev/null && $(HAVE_BUILD); then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "missing sandbox runtimes or build tools: run  sudo apt-get install -y $(SYSTEM_PACKAGES)" >&2; exit 1; \
	fi

$(STAMP): pyproject.toml setup.py native/hmac.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,peers,bench]'
	@$(PY) -c "import runtime._hmac" || { echo "runtime._hmac (native/hmac.c) did not build: see pip's output" >&2; exit 1; }
	touch $(STAMP)

$(MCP_DIR)/.installed: $(MCP_DIR)/package.json $(MCP_DIR)/package-lock.json  ## the npm MCP servers, as locked (node, npm: apt-get install nodejs npm)
	@command -v npm >/dev/null || { echo "npm is missing: run  sudo apt-get install -y nodejs npm" >&2; exit 1; }
	npm ci --silent --no-audit --no-fund --prefix $(MCP_DIR)
	touch $@

demo: setup            ## set up, then run the demo job on a local Ray
	$(VENV)/bin/warden run jobs/demo.yaml

test: setup            ## set up, then run every test; fails on any failure or on no tests
	$(VENV)/bin/pytest -q --durations=15

test-unit: setup       ## unit tests only (no Ray), milliseconds each
	$(VENV)/bin/pytest -q tests/unit

test-sandbox: setup    ## the isolation tests, on both sandbox backends
	$(VENV)/bin/pytest -q tests/sandbox

test-cluster: setup    ## tests on one shared real Ray instance
	$(VENV)/bin/pytest -q tests/cluster

redteam: setup         ## run the attack catalogue on a private Ray (also run by tests/cluster/test_redteam.py)
	$(VENV)/bin/warden redteam

mutate: setup          ## mutation testing of runtime/trusted/ against tests/unit; MUTANTS='runtime.trusted.ledger*' for one module
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install --quiet -e '.[mutate]'
	$(VENV)/bin/mutmut run --max-children $(or $(MUTATE_JOBS),2) $(if $(MUTANTS),"$(MUTANTS)")
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) $(MCP_DIR)/node_modules $(MCP_DIR)/.installed runs .pytest_cache .hypothesis mutants
