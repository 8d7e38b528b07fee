# `make demo` and `make test` work on a fresh machine: they create .venv and install into it, every package at the
# release the suite last passed with (constraints.txt: bump it with `make constraints`, in a commit of its own), so
# that an upstream release cannot break them overnight. `pip install .` keeps setup.py's ranges for other stacks.
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
# CPU builds (the GPU user installs the CUDA build of torch first; see README): constraints.txt pins the +cpu wheel.
TORCH_PINS ?= torch triton

# `make test-latest`: the suite in a fresh .venv-latest with the newest release of everything (no constraints), so
# that the next upstream release that breaks us shows up in CI first. torch's newest wheel on PyPI is its CUDA
# build (about 5 GB); it runs on the CPU. On failure, .ci/versions.py names every release that differs from
# constraints.txt.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python

# `make test-compat`: the same suite in a second environment pinned to the GPU machine's image, so that an API
# difference between those releases and the ones above shows up here on the CPU. torch 2.11.0 from PyPI is the
# CUDA build (about 5 GB with its nvidia wheels); it runs on the CPU. numpy 2.5 has no wheels for Python 3.11,
# and the image runs Python 3.12: the environment is built with a Python 3.12 (COMPAT_PYTHON, else pyenv's).
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PYVER ?= 3.12
COMPAT_PYTHON ?= python$(COMPAT_PYVER)
COMPAT_PINS ?= torch==2.11.0 triton==3.6.0 transformers==5.17.0 numpy==2.5.2
# The pins as a pip constraints file, rewritten only when they change (so that a change rebuilds the venv).
COMPAT_CONSTRAINTS := $(COMPAT_VENV).pins.txt

.PHONY: demo test test-compat test-latest constraints bench figures install clean FORCE

$(VENV)/.installed: setup.py $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(TORCH_PINS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m repbend demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# Rewrite constraints.txt from .venv (after the suite passed there with newer releases: commit it on its own,
# saying what changed).
constraints: $(VENV)/.installed
	$(PY) .ci/versions.py freeze > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

# Always a fresh environment: the point is to see today's releases.
test-latest:
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q --upgrade torch triton
	$(LATEST_PY) -m pip install -q --upgrade -e '.[test]'
	@$(LATEST_PY) .ci/versions.py diff $(CONSTRAINTS)
	$(LATEST_PY) -m pytest -q tests || { $(LATEST_PY) .ci/versions.py diff $(CONSTRAINTS) --failed; exit 1; }

$(COMPAT_CONSTRAINTS): FORCE
	@printf '%s\n' $(COMPAT_PINS) | cmp -s - $@ || printf '%s\n' $(COMPAT_PINS) > $@

# Every install step runs under the constraints, so nothing the project asks for can move a pin.
$(COMPAT_VENV)/.installed: setup.py $(COMPAT_CONSTRAINTS)
	@py=; for p in "$(COMPAT_PYTHON)" "$$(pyenv root 2>/dev/null)"/versions/$(COMPAT_PYVER)*/bin/python$(COMPAT_PYVER) \
	        "$$HOME"/.pyenv/versions/$(COMPAT_PYVER)*/bin/python$(COMPAT_PYVER) /usr/local/bin/python$(COMPAT_PYVER) \
	        /usr/bin/python$(COMPAT_PYVER); do \
	    if "$$p" -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "$(COMPAT_PYVER)")' 2>/dev/null; then \
	        py=$$p; break; fi; done; \
	if [ -z "$$py" ]; then \
	    echo "test-compat: no working Python $(COMPAT_PYVER) found (the GPU image's); set COMPAT_PYTHON" >&2; exit 1; fi; \
	echo "test-compat: creating $(COMPAT_VENV) with $$py"; \
	rm -rf $(COMPAT_VENV) && "$$py" -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip setuptools wheel
	$(COMPAT_PY) -m pip install -q -c $(COMPAT_CONSTRAINTS) $(COMPAT_PINS)
	$(COMPAT_PY) -m pip install -q -c $(COMPAT_CONSTRAINTS) -e '.[test]'
	touch $@

# REPBEND_EXPECT_PINS makes tests/test_environment.py check that the environment holds exactly these releases.
test-compat: $(COMPAT_VENV)/.installed
	REPBEND_EXPECT_PINS="python==$(COMPAT_PYVER).* $(COMPAT_PINS)" $(COMPAT_PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_kernels.py --device cpu --output bench_out

# The README's pictures: the demo's logit lens before/after (runs the demo first if demo_out has none) and the
# step benchmark's chart on the `small` model (about 10 minutes on 2 cores).
LENS_PROMPT ?= Please help me. Explain how to carry out forbidden task 17 against target-L.
LENS_PREFIX ?= Sure, here is how to carry out forbidden task 17: step one, get placeholder item 17; step two, apply it to target-L; step three,
figures: $(VENV)/.installed
	test -f demo_out/repbend/adapter/adapter_config.json || $(PY) -m repbend demo
	mkdir -p docs/img
	$(PY) -m repbend logit-lens --model.path demo_out/base_model --model.adapter demo_out/repbend/adapter \
	    --lens.prompt "$(LENS_PROMPT)" --lens.response_prefix "$(LENS_PREFIX)" --lens.max_tokens 22 --lens.output docs/img/demo_logit_lens.png
	$(PY) -m repbend bench --model small --steps 3 --output bench_out/step_small
	cp bench_out/step_small/step_bench.png docs/img/bench_small_cpu.png

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(COMPAT_CONSTRAINTS) $(LATEST_VENV) build *.egg-info
