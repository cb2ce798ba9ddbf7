"""pre_rms_norm: DeepSpeed's `pre_rms_norm` op - residual add, then RMSNorm, in one pass.

    r   = round(vals + residual)          (sum in float32, rounded to the dtype)  -> residual_out
    out = rms_norm(r, gamma, epsilon)      (the norm reads the rounded sum, as DeepSpeed's kernel does)
    returns (out, r)

`vals` and `residual` are `[..., H]` of one dtype (float32, float16 or bfloat16; any strides), `gamma`
`[H]`; one dtype-generic function, as DeepSpeed's. DeepSpeed's kernel writes the sum back into
`residual`; here both outputs are new tensors and no argument is modified.
"""
from __future__ import annotations

import torch

from ..checks import InputError, dtype_name, no_backward
from .base import CALL_ERRORS, InferenceOp
from .rms_norm import NormShape, check_rms_norm, check_tensor, rms_norm_fp32, usual_epsilon
from .spec import OpSpec


def check_pre_rms_norm(op: str, vals, residual, gamma, epsilon, act_dtype=None, *,
                       names: tuple[str, str] = ("vals", "residual")) -> NormShape:
    """Validate pre_rms_norm's arguments (`names`: what the op calls its two activations)."""
    x, r = names
    shape = check_rms_norm(op, vals, gamma, epsilon, act_dtype, name=x)
    check_tensor(op, r, residual, vals)
    if residual.dtype != vals.dtype:
        raise InputError(op, r, f"expected dtype {dtype_name(vals.dtype)} (same as {x}), got "
                                f"{dtype_name(residual.dtype)}")
    if residual.shape != vals.shape:
        raise InputError(op, r, f"expected shape {tuple(vals.shape)} (same as {x}), got {tuple(residual.shape)}")
    return shape


def residual_sum(vals: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """vals + residual in float32, rounded to vals' dtype once."""
    return (vals.to(torch.float32) + residual.to(torch.float32)).to(vals.dtype)


def pre_rms_norm(vals, residual, gamma, epsilon, *, op: str = "pre_rms_norm") -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the rounded sum, then the norm of it in float32, rounded once."""
    check_pre_rms_norm(op, vals, residual, gamma, epsilon)
    res = residual_sum(vals, residual)
    return rms_norm_fp32(res.to(torch.float32), gamma, float(epsilon)).to(vals.dtype), res


def _samples(device, dtype, gen):
    x = torch.randn(2, 3, 64, generator=gen).to(device, dtype)
    r = torch.randn(2, 3, 64, generator=gen).to(device, dtype)
    g = torch.randn(64, generator=gen).to(device, dtype)
    x61, r61 = (torch.randn(1, 1, 61, generator=gen).to(device, dtype) for _ in range(2))
    g61 = torch.randn(61, generator=gen).to(device, dtype)
    return [(x, r, g, 1e-5), (x61, r61, g61, 1e-6)]


SPEC = OpSpec(
    name="pre_rms_norm",
    schema="(Tensor vals, Tensor residual, Tensor gamma, float epsilon) -> (Tensor, Tensor)",
    reference=pre_rms_norm,
    check=check_pre_rms_norm,
    output_shapes=lambda shape: [shape.shape, shape.shape],
    samples=_samples,
    op_class="PreRMSNormOp",
    per_dtype=False,
)


class PreRMSNormOp(InferenceOp):
    """DeepSpeed's PreRMSNormOp: `PreRMSNormOp(config)(vals, residual, gamma, epsilon)` ->
    `(rms_norm(vals + residual), vals + residual)`. The dtype is the input's (no config field is read)."""
    OP = "pre_rms_norm"

    def forward(self, vals: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor,
                epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> `(rms_norm(vals + residual), vals + residual)`, one pass; new tensors (nothing is updated in place).

        >>> import torch, dsinf
        >>> vals, residual, gamma = torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.rand(64)
        >>> normed, summed = dsinf.PreRMSNormOp()(vals, residual, gamma, 1e-6)
        >>> torch.equal(summed, vals + residual)
        True
        >>> torch.allclose(normed, dsinf.RMSNormOp()(vals + residual, gamma, 1e-6), atol=1e-5)
        True
        """
        return self._call(vals)(vals, residual, gamma, epsilon)

    def _bind(self, impl, checked):
        owner, grad_enabled = type(self).__name__, torch.is_grad_enabled

        def slow(vals, residual, gamma, epsilon):
            check_pre_rms_norm(owner, vals, residual, gamma, epsilon)
            if grad_enabled():
                no_backward(owner, vals=vals, residual=residual, gamma=gamma)
            return impl(vals, residual, gamma, float(epsilon))

        if checked:
            return slow

        def fast(vals, residual, gamma, epsilon):  # the compiled backend validates in C++, grad mode included
            if usual_epsilon(epsilon):
                try:
                    return impl(vals, residual, gamma, epsilon)
                except CALL_ERRORS:  # rejected (residual=None, a bad shape, grad): name it
                    pass
            return slow(vals, residual, gamma, epsilon)

        return fast
