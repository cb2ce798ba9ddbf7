"""`OpSpec`: everything about one op in one value, and the registry of every op's spec.

An op is one module of this package (`dsinf/ops/<op>.py`) that defines `SPEC = OpSpec(...)` beside its
pure-torch reference and its op class. Everything that needs "the list of ops" reads `specs()`: the
schema definitions and fake kernels (`dsinf.library`), the module view (`dsinf.builder.InferenceModule`),
the build's sanity check (`dsinf.builder`), the backend choice (`dsinf.dispatch`), the exports
(`dsinf.LinearOp`, `dsinf.reference.linear_layer`) and the structural test. No list of ops is kept by
hand anywhere: the registry is discovered by listing this package (`pkgutil`, a directory listing, no
import) and importing the modules that are not infrastructure (`INFRASTRUCTURE`). A static table would
be one more file to edit per op (and one to forget); discovery runs once, on the first use of an op, never
on `import dsinf`.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..checks import FLOAT_DTYPES

#: Modules of this package that are not ops.
INFRASTRUCTURE = frozenset({"base", "spec"})


@dataclass(frozen=True)
class LeanEntry:
    """An op's internal eager-only entry for its common case: fewer arguments and a plain Tensor result.

    torch's Python call of a custom op costs about 0.37 us per scalar argument and 1 us for a `Tensor[]`
    result (docs/PERFORMANCE.md, "Per-call host cost"): the op class's fast path calls this entry when
    the call fits it, and the op's own function otherwise. Never the public API, never traced (under
    torch.compile the op classes call the op's own function). Defined per dtype as
    `<name>_lean_<dtype>`; both bindings register it, and `InferenceOp._bind_eager` passes it to the op
    class's `_bind` where the loaded binary has a kernel for it.

    schema     "(<arguments>) -> Tensor"
    full_args  `full_args(*lean_args) -> schema_args`: the same call through the op's own function, whose
               first output is this entry's result (its fake kernel, and the tests' oracle)
    """
    schema: str
    full_args: Callable[..., tuple]


@dataclass(frozen=True)
class OpSpec:
    """One op: its schema, checks, reference, implementations and samples.

    name           the op family, e.g. "linear_layer" (DeepSpeed's module-function name without dtype)
    schema         "(<arguments>) -> <returns>" in torch's schema language; argument names = the
                   reference's parameters, in order (DeepSpeed's positional order)
    reference      the pure-torch semantics, `reference(*schema_args)`: the last-resort backend and the
                   oracle of every test; validates its own arguments (calls `check`)
    check          `check(op, *schema_args, act_dtype=None) -> problem`: raises `InputError` naming the
                   argument; the same rules as the C++ binding's validation, word for word
    output_shapes  `output_shapes(problem) -> [shape, ...]`: the fake (meta) kernel's outputs, which take
                   the input's dtype and device (set `fake` for an op whose outputs differ)
    samples        `samples(device, dtype, generator) -> [args, ...]`: small random valid argument tuples
                   (the build's sanity check and the bench run them against the reference)
    op_class       name of the `InferenceOp` subclass in the op's module; exported as `dsinf.<op_class>`
    triton         name of the `dsinf.triton` function implementing the op, or None: Triton is not
                   applicable to it (never a fallback, never a warning)
    per_dtype      True: module functions `<name>_fp32|fp16|bf16` (the dtype in the name, as DeepSpeed's
                   `linear_layer_fp16`); False: one function `<name>` that takes its dtype from the input
    fake           optional `fake(op, act_dtype) -> kernel` replacing the generic one
    lean           optional `LeanEntry`: the op class's cheaper eager entry for the common case
    """
    name: str
    schema: str
    reference: Callable[..., Any]
    check: Callable[..., Any]
    output_shapes: Callable[[Any], list[tuple[int, ...]]]
    samples: Callable[[torch.device, torch.dtype, torch.Generator], list[tuple]]
    op_class: str
    triton: str | None = None
    per_dtype: bool = True
    fake: Callable[[str, torch.dtype | None], Callable[..., Any]] | None = None
    lean: LeanEntry | None = None

    def functions(self) -> dict[str, torch.dtype | None]:
        """Module function name -> activation dtype it is compiled for (None: the input's)."""
        if not self.per_dtype:
            return {self.name: None}
        return {f"{self.name}_{suffix}": dtype for suffix, dtype in FLOAT_DTYPES.items()}

    def lean_functions(self) -> dict[str, torch.dtype | None]:
        """The lean entry's function name -> activation dtype (empty without a lean entry)."""
        if self.lean is None:
            return {}
        return {self.lean_function(name): dtype for name, dtype in self.functions().items()}

    def lean_function(self, function: str) -> str:
        """The lean entry's function beside module function `function` (`linear_layer_fp16` ->
        `linear_layer_lean_fp16`)."""
        return f"{self.name}_lean{function[len(self.name):]}"

    def function(self, act_dtype: torch.dtype) -> str:
        """The module function that runs activations of `act_dtype`."""
        if not self.per_dtype:
            return self.name
        return next(name for name, dtype in self.functions().items() if dtype == act_dtype)

    @property
    def argument_names(self) -> tuple[str, ...]:
        """The schema's argument names, in order."""
        args = self.schema[self.schema.index("(") + 1:self.schema.rindex(") ->")]
        return tuple(re.match(r"\s*\S+\s+(\w+)", a).group(1) for a in args.split(",") if a.strip())

    @property
    def returns(self) -> str:
        """'Tensor' (one tensor), 'Tensor[]' (a list) or '(Tensor, ...)' (a tuple)."""
        return self.schema.rsplit("->", 1)[1].strip()

    def fake_kernel(self, op: str, act_dtype: torch.dtype | None) -> Callable[..., Any]:
        """The fake (meta) kernel of function `op`: the checks, then empty outputs of the right shapes."""
        if self.fake is not None:
            return self.fake(op, act_dtype)
        check, output_shapes, returns = self.check, self.output_shapes, self.returns

        def fake(input, *args):
            outs = [input.new_empty(s) for s in output_shapes(check(op, input, *args, act_dtype=act_dtype))]
            if returns == "Tensor":
                return outs[0]
            return outs if returns == "Tensor[]" else tuple(outs)

        return fake

    def lean_fake_kernel(self, op: str, act_dtype: torch.dtype | None) -> Callable[..., Any]:
        """The fake kernel of lean function `op`: the op's own fake kernel on `lean.full_args`, first output."""
        full, full_args = self.fake_kernel(op, act_dtype), self.lean.full_args

        def fake(*args):
            outs = full(*full_args(*args))
            return outs if isinstance(outs, torch.Tensor) else outs[0]

        return fake


def op_module_names() -> list[str]:
    """Names of the op modules of this package (a directory listing: nothing is imported)."""
    package = importlib.import_module(__package__)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name not in INFRASTRUCTURE)


@functools.cache
def _registry() -> tuple[dict[str, OpSpec], dict[str, OpSpec], dict[str, str]]:
    by_name: dict[str, OpSpec] = {}
    by_function: dict[str, OpSpec] = {}
    modules: dict[str, str] = {}  # op name -> module
    for module_name in op_module_names():
        module = importlib.import_module(f"{__package__}.{module_name}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, OpSpec):
            raise TypeError(f"dsinf.ops.{module_name} defines no SPEC = OpSpec(...): every module of dsinf.ops "
                            f"but {', '.join(sorted(INFRASTRUCTURE))} is an op")
        if spec.name in by_name:
            raise ValueError(f"two ops named {spec.name!r}")
        by_name[spec.name] = spec
        modules[spec.name] = module.__name__
        for function in spec.functions():
            by_function[function] = spec
    return by_name, by_function, modules


def specs() -> dict[str, OpSpec]:
    """Every op's spec, by op name (sorted by module name)."""
    return _registry()[0]


def get(name: str) -> OpSpec:
    """The spec of op `name` (e.g. "vector_matmul")."""
    try:
        return specs()[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; ops: {', '.join(specs())}") from None


def functions() -> tuple[str, ...]:
    """Every module function name (e.g. 'linear_layer_bf16'), in the report's order."""
    return tuple(_registry()[1])


def spec_of_function(function: str) -> OpSpec | None:
    return _registry()[1].get(function)


def op_class(class_name: str):
    """The op class exported as `dsinf.<class_name>`, or None."""
    by_name, _, modules = _registry()
    for name, spec in by_name.items():
        if spec.op_class == class_name:
            return getattr(importlib.import_module(modules[name]), class_name)
    return None
