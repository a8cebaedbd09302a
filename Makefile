# deeplense-ray: `make test` (virtualenv + install + pytest), `make demo` (the main job on embedded defaults).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU build of torch; a machine with an NVIDIA driver takes PyPI's default (CUDA) wheel.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
PYTEST_ARGS ?=

.PHONY: install test demo lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	# Triton for its CPU interpreter (the fused renderer's tests; CUDA builds of torch ship it), kept out of
	# the environment's import path: the tests put it on theirs
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q --no-deps --target $(VENV)/triton-interp triton==3.5.0
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check deeplense_ray jobs tests benchmarks scripts
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) jobs/demo.py

lint: install
	$(PY) -m ruff check deeplense_ray jobs tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
