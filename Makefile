# Two commands do everything on a fresh machine (see README):
#   make demo   set up, build on first use, run both ops against the reference, print the report
#   make test   set up, run the test suite (builds the CPU module from source in a fresh cache)
PYTHON ?= python3
# Installed only when torch is missing. Pinned so pip never resolves the newest multi-GB CUDA build
# on a CPU machine; on a GPU machine install your CUDA torch first and this is skipped.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo report test test-gpu bench clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m dsinf.demo

report:
	$(PYTHON) -m op_builder.report

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# On a CUDA machine: the GPU tests only.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

bench:
	$(PYTHON) -m bench

clean:
	rm -rf build dist *.egg-info .pytest_cache op_builder/prebuilt
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
