# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean lint eval-env

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

# The evaluation environment of the learned metrics (LPIPS, NIQE, MANIQA, MUSIQ, CLIPIQA):
# torch + torchvision + pyiqa, locked in requirements-eval.txt, in a venv of its own (about 7 GB;
# never part of `make test`); tools/evaluate.py runs them there (docs/evaluation.md).
EVAL_VENV ?= .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_STAMP := $(EVAL_VENV)/.installed

eval-env: $(EVAL_STAMP)

$(EVAL_STAMP): requirements-eval.txt
	test -x $(EVAL_PY) || python3.11 -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install -q --upgrade pip
	$(EVAL_PY) -m pip install -q -r requirements-eval.txt
	$(EVAL_PY) -I framer_dist/iqa_worker.py --versions
	@touch $(EVAL_STAMP)

demo: $(STAMP)
	$(PY) -m framer_dist.demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
