# The two commands of the README: `make demo` and `make test`. Both create or refresh the
# virtualenv (.venv) from requirements.lock when it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lock clean

venv: $(STAMP)

$(STAMP): requirements.lock setup.py
	@echo "== building $(VENV) from requirements.lock (first time: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@set -o pipefail; $(PY) -m pip install -q --upgrade pip==26.3 setuptools==84.2.1 wheel==0.48.0 2>&1 | { grep -v '^WARNING: Location' || true; }
	@# the machine's pip.conf names local indexes that warn on every package: keep the log readable
	@set -o pipefail; DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.lock 2>&1 | { grep -v '^WARNING: Location' || true; }
	@set -o pipefail; $(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -vE '^WARNING: Location|^ +' || true; }
	@touch $(STAMP)

demo: venv
	$(PY) -m training.demo

test: venv
	$(PY) -m pytest tests

test-fast: venv
	$(PY) -m pytest tests -m "not slow"

# Re-resolve requirements.txt into requirements.lock (exact versions of everything).
lock:
	rm -rf /tmp/lockvenv && $(PYTHON) -m venv /tmp/lockvenv
	DS_BUILD_OPS=0 /tmp/lockvenv/bin/pip install -q -r requirements.txt
	/tmp/lockvenv/bin/pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
