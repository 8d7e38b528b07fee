# `make demo` and `make test` work on a fresh machine: they create .venv and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU builds (the GPU user installs the CUDA build of torch first; see README).
TORCH_PINS ?= torch==2.13.0 triton==3.7.1

.PHONY: demo test bench install clean

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m repbend demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_kernels.py --device cpu --output bench_out

clean:
	rm -rf $(VENV) build *.egg-info
