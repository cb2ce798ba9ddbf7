# Two commands do everything on a fresh machine (see README). Both install into the active Python:
#   make demo   set up what the demo needs, build on first use, run both ops against the reference, print the report
#   make test   set up the test dependencies, run the test suite (builds the CPU module from source in a fresh cache)
PYTHON ?= python3
# Installed only when torch is missing. Pinned so pip never resolves the newest multi-GB CUDA build
# on a CPU machine; on a GPU machine install your CUDA torch first and this is skipped.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PIP = $(PYTHON) -m pip install -q
# The installed torch, pinned as a constraint: installing the package (whose `torch>=2.1` is a range)
# must never make pip resolve, upgrade or replace torch.
TORCH_PIN = build/torch-constraint.txt

.PHONY: torch setup setup-test demo report test test-gpu bench clean

torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "make: installing $(TORCH_SPEC) (torch is missing)"; \
		$(PIP) "$(TORCH_SPEC)"; }
	@mkdir -p build && $(PYTHON) -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
		> $(TORCH_PIN)

setup: torch
	@echo "make: installing dsinf (editable) with ninja, py-cpuinfo, numpy into $$($(PYTHON) -c 'import sys; print(sys.prefix)')"
	$(PIP) -c $(TORCH_PIN) -e .

setup-test: torch
	@echo "make: installing dsinf (editable) with the test dependencies (pytest, hypothesis, triton, ...)"
	$(PIP) -c $(TORCH_PIN) -e ".[test]"

demo: setup
	$(PYTHON) -m dsinf.demo

report:
	$(PYTHON) -m op_builder.report

# Two pytest runs: triton decides interpreter-or-compiler when it is imported, so the Triton
# interpreter cases on CPU tensors need a process started with TRITON_INTERPRET=1.
test: setup-test
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests/test_ops.py -k triton-cpu

# On a CUDA machine: the GPU tests only.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

bench:
	$(PYTHON) -m bench

clean:
	rm -rf build dist *.egg-info .pytest_cache op_builder/prebuilt
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
