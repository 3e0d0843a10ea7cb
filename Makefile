# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean lint

venv: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on this platform's disk; an unpinned resolve pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

# One thread per process: the distributed tests run several ranks on CI's 2 cores.
test: $(STAMP)
	$(PY) tools/check_env.py
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m framer_dist.demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
