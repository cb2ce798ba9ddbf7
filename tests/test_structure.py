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
    lean = {f for s in SPECS for f in s.lean_functions()}  # internal eager entries (OpSpec.lean)
    assert defined == set(library.functions()) | lean
    assert all(op_spec.spec_of_function(f) is not None for f in defined - lean)


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


# --- the C++ validation: generic primitives in validate.h, each op's rules once, in op_rules.h ---------------

BINDING = ROOT / "csrc" / "inference" / "binding"


def _op_words() -> set[str]:
    """What names an op in C++: its spec name, its functions and its module name (e.g. mlp_gemm)."""
    words = set(op_spec.op_module_names())
    for spec in SPECS:
        words |= {spec.name, *spec.functions()}
    return words


def test_validate_h_names_no_op():
    # Adding an op touches op_rules.h and its binding entries, never validate.h: it holds primitives only.
    import re

    text = (BINDING / "validate.h").read_text()
    named = sorted(w for w in _op_words() if re.search(rf"\b{re.escape(w)}\b", text))
    assert named == [], f"validate.h names ops {named}: compose an op's checks in op_rules.h"


def _defined_checks(pattern: str) -> set[str]:
    """The check_* functions the binding files matching `pattern` define (a definition starts a line)."""
    import re

    found = set()
    for path in BINDING.glob(pattern):
        found |= set(re.findall(r"^[A-Za-z][\w:<>, ]*\s(check_\w+)\(", path.read_text(), re.M))
    return found


def test_each_op_rule_is_written_once_for_both_bindings():
    # An op's rules live in op_rules.h, which both bindings include: a check defined in the CPU and again in the
    # CUDA binding is a copy that can drift (other words, another order) from its twin.
    cpu, cuda = _defined_checks("cpu_binding*.cpp"), _defined_checks("cuda_binding*.cpp")
    assert "check_rms_norm" in _defined_checks("op_rules.h")  # the pattern finds definitions
    assert cpu & cuda == set(), f"defined in both bindings: {sorted(cpu & cuda)}; move them to op_rules.h"


def _mutations(args: tuple, schema_types: list[str]):
    """(what, args) pairs that break one argument of a valid call, within what the schema accepts."""
    for i, (value, typ) in enumerate(zip(args, schema_types)):
        if isinstance(value, torch.Tensor):
            changed = {
                "float64": value.double(), "int8": value.to(torch.int8), "extra-dim": value.unsqueeze(0),
                "0-d": value.reshape(-1)[0].clone(), "empty-last": value[..., :0],
                "short-last": value[..., :-1].contiguous(), "non-contiguous": value.unsqueeze(-1).expand(
                    *value.shape, 2)[..., 0],
            }
            if i:  # the first tensor decides the dispatch key: a meta one would run the fake kernel
                changed["other-device"] = value.to("meta")
            if typ.endswith("?"):
                changed["None"] = None
        elif isinstance(value, bool):
            changed = {"flipped": not value}
        elif isinstance(value, float):
            changed = {"zero": 0.0, "negative": -1.0, "nan": float("nan"), "inf": float("inf")}
        elif isinstance(value, int):
            changed = {"zero": 0, "minus-one": -1, "plus-one": value + 1, "huge": 2**62}
        else:
            continue
        for what, new in changed.items():
            yield f"arg{i}-{what}", args[:i] + (new,) + args[i + 1:]


def _outcome(call) -> str:
    try:
        call()
    except ValueError as exc:
        return f"ValueError: {exc}"
    except Exception as exc:  # noqa: BLE001 - any other failure is reported as such, and differs
        return f"{type(exc).__name__}: {exc}"
    return "passes"


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_cpp_and_python_validation_agree_on_every_op(spec, cpu_module):
    """A direct torch.ops.dsinf.* call on CPU and the op's Python checks (what the op classes and the reference
    run) accept the same arguments and reject the rest with the same words, for one argument broken at a
    time in every sample of the spec: the table of bad inputs is derived from the spec, so a new op is
    covered without a line here."""
    types = [a.split()[0] for a in spec.schema[spec.schema.index("(") + 1:spec.schema.rindex(") ->")].split(",")]
    checked = rejected = 0
    for dtype in (torch.float32, torch.bfloat16):
        function = spec.function(dtype)
        compiled = getattr(torch.ops.dsinf, function)
        act = spec.functions()[function]
        for sample in spec.samples("cpu", dtype, torch.Generator().manual_seed(0)):
            for what, args in _mutations(tuple(sample), types):
                cpp = _outcome(lambda: compiled(*args))
                python = _outcome(lambda: spec.check(function, *args, act_dtype=act))
                if python == "passes" and not cpp.startswith("ValueError"):
                    continue  # valid arguments: the kernel ran (or failed for a reason that is not validation)
                assert cpp == python, f"{function} {what}"
                checked += 1
                rejected += cpp.startswith("ValueError")
    assert rejected >= 10, f"only {rejected} of {checked} mutations were rejected: the table tests nothing"


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_op_refuses_a_tensor_that_requires_grad(spec, cpu_module):
    """Inference-only on every route: with grad mode on, a float tensor argument that requires grad is a
    ValueError naming it, in C++ (the GEMV route used to return a gradless result and the ATen route raised
    torch's out= error); scales are exempt, as in Python's no_backward. Under no_grad the same call runs."""
    args_text = spec.schema[spec.schema.index("(") + 1:spec.schema.rindex(") ->")]
    names = [a.split()[1].split("=")[0] for a in args_text.split(",")]
    compiled = getattr(torch.ops.dsinf, spec.function(torch.float32))
    refused = 0
    for sample in spec.samples("cpu", torch.float32, torch.Generator().manual_seed(0)):
        for i, value in enumerate(sample):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or names[i].startswith("q_scale"):
                continue
            args = list(sample)
            args[i] = value.detach().clone().requires_grad_(True)
            with pytest.raises(ValueError, match=f"argument '{names[i]}': requires grad"):
                compiled(*args)
            with torch.no_grad():
                compiled(*args)
            refused += 1
    assert refused >= 2
