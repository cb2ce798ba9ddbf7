"""The structure the rest of the code relies on: op_builder is generic, and each op is one spec whose
schema, checks, reference and fake kernel agree (the spec table drives all of them)."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from dsinf import library, reference
from dsinf.ops import spec as op_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = list(op_spec.specs().values())


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_op_builder_imports_nothing_from_dsinf():
    files = sorted((ROOT / "op_builder").rglob("*.py"))
    assert files
    upward = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "dsinf") for p in files}
    assert {f: m for f, m in upward.items() if m} == {}


def test_every_op_module_has_a_spec():
    modules = op_spec.op_module_names()
    assert modules, "no op modules found"
    for name in modules:
        module = __import__(f"dsinf.ops.{name}", fromlist=["SPEC"])
        assert isinstance(getattr(module, "SPEC", None), op_spec.OpSpec), f"dsinf/ops/{name}.py has no SPEC"
    assert sorted(s.name for s in SPECS) == sorted(op_spec.specs())


def test_every_library_function_has_a_spec():
    library.define()
    defined = {op.split("::")[1].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
               if op.startswith("dsinf::")}
    assert defined == set(library.functions())
    assert all(op_spec.spec_of_function(f) is not None for f in defined)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_schema_reference_and_checks_agree(spec):
    params = list(inspect.signature(spec.reference).parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert tuple(positional) == spec.argument_names, "schema argument names = reference parameters, in order"
    check_params = [p.name for p in inspect.signature(spec.check).parameters.values()]
    assert check_params[0] == "op" and tuple(check_params[1:1 + len(positional)]) == spec.argument_names
    assert "act_dtype" in check_params
    assert getattr(reference, spec.name) is spec.reference  # dsinf.reference.<op> is the spec's reference
    import dsinf

    cls = getattr(dsinf, spec.op_class)
    assert cls.OP == spec.name and getattr(dsinf.ops, spec.op_class) is cls


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_kernel_matches_the_reference_on_the_samples(spec, dtype):
    library.define()
    gen = torch.Generator().manual_seed(0)
    samples = spec.samples("cpu", dtype, gen)
    assert samples
    for args in samples:
        want = spec.reference(*args)
        want = list(want) if isinstance(want, (list, tuple)) else [want]
        assert all(isinstance(w, torch.Tensor) and w.dtype == dtype for w in want)
        assert all(not w.isnan().any() and w.abs().sum() > 0 for w in want), "samples must be random, not zeros"
        # the fake kernel directly, and through the registered op on meta tensors
        fake = spec.fake_kernel(spec.function(dtype), dtype)(*args)
        fake = list(fake) if isinstance(fake, (list, tuple)) else [fake]
        assert [f.shape for f in fake] == [w.shape for w in want]
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        out = getattr(torch.ops.dsinf, spec.function(dtype))(*meta)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        assert [o.shape for o in out] == [w.shape for w in want]
        assert [o.dtype for o in out] == [w.dtype for w in want]
        # the problem the checks return gives the same shapes as the reference
        assert [tuple(s) for s in spec.output_shapes(spec.check(spec.name, *args))] == [tuple(w.shape) for w in want]


def test_adding_an_op_needs_no_list_in_python():
    # Nothing lists ops by hand: the exports, the library and the module view all come from the specs.
    import dsinf

    for spec in SPECS:
        assert spec.op_class in dsinf.__all__
        assert set(spec.functions()) <= set(library.functions())
    for path in (ROOT / "dsinf" / "__init__.py", ROOT / "dsinf" / "library.py", ROOT / "dsinf" / "builder.py"):
        code = _code_without_docs(path)
        for spec in SPECS:
            assert spec.name not in code and spec.op_class not in code, f"{path.name} names {spec.name}"


def _code_without_docs(path: Path) -> str:
    """The module's code without docstrings and without its `if TYPE_CHECKING:` block."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)):
            node.body = body[1:] or [ast.Pass()]
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    return ast.unparse(tree)
