"""rms_norm: DeepSpeed's `rms_norm` op - RMSNorm over the last dimension, float32 accumulation.

    out[.., i] = x[.., i] * rsqrt(mean_i(x[.., i]^2) + epsilon) * gamma[i]        (rounded once)

`vals` is `[..., H]` (any leading dims, any strides: the bindings copy it), `gamma` `[H]`, both of one
dtype (float32, float16 or bfloat16), which the output takes: one dtype-generic function `rms_norm`, as
DeepSpeed's. DeepSpeed rounds `x * rsqrt` and then `* gamma` separately; we round once. `RMSNormOp()`
works without a config (it reads none of its fields). The norm checks shared by `pre_rms_norm` and
`rms_mlp_gemm` live here too; the C++ twins are in the binding entries
(`csrc/inference/binding/*_binding*.cpp`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..checks import DTYPE_SUFFIX, InputError, dense, dtype_name, no_backward
from .base import CALL_ERRORS, InferenceOp
from .spec import OpSpec


@dataclass(frozen=True)
class NormShape:
    shape: tuple  # the input's shape [..., H] (every output has it)
    H: int


def _fail(op: str, arg: str, message: str):
    raise InputError(op, arg, message)


def check_tensor(op: str, name: str, t, like: torch.Tensor | None = None) -> None:
    """`t` is a Tensor (on `like`'s device)."""
    if not isinstance(t, torch.Tensor):
        _fail(op, name, f"expected a Tensor, got {'None' if t is None else type(t).__name__}")  # C++'s words
    dense(op, name, t)
    if like is not None and t.device != like.device:
        _fail(op, name, f"is on {t.device} but the input is on {like.device}")


def check_epsilon(op: str, epsilon) -> None:
    """A real number (a numpy float from a config too, as torch.ops takes it), finite and > 0; not a bool."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        _fail(op, "epsilon", f"expected a float, got {type(epsilon).__name__}")
    if not math.isfinite(epsilon) or epsilon <= 0:
        _fail(op, "epsilon", f"must be finite and > 0, got {epsilon}")


def check_rms_norm(op: str, vals, gamma, epsilon, act_dtype=None, *, name: str = "vals") -> NormShape:
    """Validate rms_norm's arguments (`name`: what the op calls its activation)."""
    check_tensor(op, name, vals)
    if act_dtype is not None and vals.dtype != act_dtype:
        _fail(op, name, f"expected dtype {dtype_name(act_dtype)}, got {dtype_name(vals.dtype)}")
    if vals.dtype not in DTYPE_SUFFIX:
        _fail(op, name, f"dtype {dtype_name(vals.dtype)} is not supported (float32, float16, bfloat16)")
    if vals.dim() < 1:
        _fail(op, name, "expected at least one dimension [..., H], got a 0-d tensor")
    H = vals.shape[-1]
    check_tensor(op, "gamma", gamma, vals)
    if gamma.dtype != vals.dtype:
        _fail(op, "gamma", f"expected dtype {dtype_name(vals.dtype)} (same as the input), got "
                           f"{dtype_name(gamma.dtype)}")
    if gamma.dim() != 1 or gamma.shape[0] != H:
        _fail(op, "gamma", f"expected shape ({H},) to match the hidden size H={H}, got {tuple(gamma.shape)}")
    check_epsilon(op, epsilon)
    return NormShape(shape=tuple(vals.shape), H=H)


def rms_norm_fp32(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> torch.Tensor:
    """float32 x -> float32 RMSNorm(x) * gamma."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon) * gamma.to(torch.float32)


def rms_norm(vals, gamma, epsilon, *, op: str = "rms_norm") -> torch.Tensor:
    """The reference: float32 statistics and scaling, rounded to the input dtype once."""
    check_rms_norm(op, vals, gamma, epsilon)
    return rms_norm_fp32(vals.to(torch.float32), gamma, float(epsilon)).to(vals.dtype)


def _samples(device, dtype, gen):
    x = torch.randn(2, 3, 64, generator=gen).to(device, dtype)
    g = torch.randn(64, generator=gen).to(device, dtype)
    x61 = torch.randn(1, 61, generator=gen).to(device, dtype)
    g61 = torch.randn(61, generator=gen).to(device, dtype)
    return [(x, g, 1e-5), (x61, g61, 1e-6)]


SPEC = OpSpec(
    name="rms_norm",
    schema="(Tensor vals, Tensor gamma, float epsilon) -> Tensor",
    reference=rms_norm,
    check=check_rms_norm,
    output_shapes=lambda shape: [shape.shape],
    samples=_samples,
    op_class="RMSNormOp",
    per_dtype=False,
)


def usual_epsilon(epsilon) -> bool:
    """What the typed schema cannot see about epsilon: a bool or an int it would take as a float."""
    return type(epsilon) is float


class RMSNormOp(InferenceOp):
    """DeepSpeed's RMSNormOp: `RMSNormOp()(vals, gamma, epsilon)`. The dtype is the input's (no config
    field is read)."""
    OP = "rms_norm"

    def forward(self, vals: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> torch.Tensor:
        """`vals * rsqrt(mean(vals**2, -1) + epsilon) * gamma` over the last dim, fp32 math, in the input's dtype.

        >>> import torch, dsinf
        >>> vals, gamma = torch.randn(2, 3, 61), torch.rand(61)
        >>> out = dsinf.RMSNormOp()(vals, gamma, 1e-6)
        >>> want = vals * torch.rsqrt(vals.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
        >>> torch.allclose(out, want, atol=1e-5)
        True
        """
        return self._call(vals)(vals, gamma, epsilon)

    def _bind(self, impl, checked):
        owner, grad_enabled = type(self).__name__, torch.is_grad_enabled

        def slow(vals, gamma, epsilon):
            check_rms_norm(owner, vals, gamma, epsilon)
            if grad_enabled():
                no_backward(owner, vals=vals, gamma=gamma)
            return impl(vals, gamma, float(epsilon))

        if checked:
            return slow

        def fast(vals, gamma, epsilon):  # the compiled backend validates in C++, grad mode included
            if usual_epsilon(epsilon):
                try:
                    return impl(vals, gamma, epsilon)
                except CALL_ERRORS:  # rejected (a list, a bad shape, a tensor that requires grad): name it
                    pass
            return slow(vals, gamma, epsilon)

        return fast
