"""Every op class documents its forward with an example, and the examples run (doctest) on the compiled
CPU backend: the README's promise that the op docs show shapes and layouts, kept honest."""
from __future__ import annotations

import doctest

import pytest

from dsinf.ops import spec

OPS = sorted(spec.specs())


@pytest.mark.parametrize("op", OPS)
def test_forward_docstring_examples_run(op, cpu_module):
    cls = spec.op_class(spec.get(op).op_class)
    doc = cls.forward.__doc__ or ""
    assert ">>>" in doc, f"{cls.__name__}.forward has no example (help() would show torch's generic text)"
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(cls.forward, f"{cls.__name__}.forward", globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{cls.__name__}.forward: {result}"
