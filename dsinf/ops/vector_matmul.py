"""vector_matmul: DeepSpeed's `vector_matmul` op - `out = x @ W`, float or int8 weight-only.

    out[b,s,n] = sum_k x[b,s,k] * W(k,n)                                     -> [B, S, N]
    int8 (q_int8 / config.dtype == torch.int8): W(k,n) = w_int8[n,k] * q_scale[n // (N/G)]

The spec (schema, checks, reference, samples), the reference and `VectorMatMulOp` live here. Unlike
DeepSpeed, an int8 weight without `.scale` is an error naming 'weight', never an unquantized matmul on
the raw int8 values. `async_op` is a hint: work always runs on the caller's current stream.
"""
from __future__ import annotations

import importlib

import torch

from ..checks import check_vector_matmul, no_backward
from ..reference import matmul_fp32
from .base import CALL_ERRORS, InferenceOp, eager_call
from .spec import LeanEntry, OpSpec


def vector_matmul(input, weight, async_op=False, q_scale=None, q_int8=False, transposed_mode=False,
                  *, op: str = "vector_matmul") -> torch.Tensor:
    """The reference: float32 matmul of the (dequantized) weight, rounded to the input dtype once."""
    shape = check_vector_matmul(op, input, weight, async_op, q_scale, q_int8, transposed_mode)
    return matmul_fp32(input, weight, shape, q_scale).to(input.dtype)


def _samples(device, dtype, gen):
    x = torch.randn(2, 3, 64, generator=gen).to(device, dtype)
    w = torch.randn(64, 96, generator=gen).to(device, dtype)
    w_nk = torch.randn(96, 64, generator=gen).to(device, dtype)
    return [(x, w), (x[:, :1], w_nk, False, None, False, True)]


SPEC = OpSpec(
    name="vector_matmul",
    schema=("(Tensor input, Tensor weight, bool async_op=False, Tensor? q_scale=None, bool q_int8=False, "
            "bool transposed_mode=False) -> Tensor"),
    reference=vector_matmul,
    check=check_vector_matmul,
    output_shapes=lambda shape: [(shape.B, shape.S, shape.N)],
    samples=_samples,
    op_class="VectorMatMulOp",
    triton="vector_matmul",
    lean=LeanEntry(  # VectorMatMulOp in eager mode: async_op dropped (a hint), q_int8 = q_scale given
        schema="(Tensor input, Tensor weight, bool transposed_mode=False, Tensor? q_scale=None) -> Tensor",
        full_args=lambda input, weight, transposed_mode=False, q_scale=None: (
            input, weight, False, q_scale, q_scale is not None, transposed_mode)),
)


class VectorMatMulOp(InferenceOp):
    OP = "vector_matmul"

    def forward(self, input: torch.Tensor, weight: torch.Tensor, async_op: bool = False) -> torch.Tensor:
        """`out = input @ W` -> one tensor `[B, S, N]` in the input's dtype (fp32 accumulation).

        `input` is `[B, S, K]`. `weight` is `[K, N]` when `config.transposed_mode` is False (the default),
        `[N, K]` (nn.Linear's layout) when True; int8 configs take an int8 `[N, K]` weight carrying
        `.scale` (`dsinf.quantize_int8`). `async_op` is accepted for DeepSpeed; work always runs on the
        caller's current stream.

        >>> import torch, dsinf
        >>> x = torch.randn(2, 3, 64)
        >>> w = torch.randn(64, 96)                                   # [K, N]
        >>> out = dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32))(x, w)
        >>> out.shape
        torch.Size([2, 3, 96])
        >>> torch.allclose(out, x @ w, atol=1e-4)
        True
        >>> w8 = dsinf.quantize_int8(w, transposed_mode=False)        # int8 [N, K] + .scale
        >>> cfg8 = dsinf.InferenceConfig(dtype=torch.int8, act_dtype=torch.float32)
        >>> dsinf.VectorMatMulOp(cfg8)(x, w8).shape
        torch.Size([2, 3, 96])
        """
        return self._call(input)(input, weight, async_op)

    def __call__(self, input, weight, async_op=False):
        call = eager_call(self, input)
        if call is None:
            return super().__call__(input, weight, async_op)
        return call(input, weight, async_op)

    def _bind(self, impl, checked, lean=None):
        owner, cfg = type(self).__name__, self.config
        quantized, transposed, act = cfg.quantized, cfg.transposed_mode, cfg.activation_dtype
        grad_enabled = torch.is_grad_enabled

        def slow(input, weight, async_op=False):
            q_scale = self._q_scale(weight)
            args = (input, weight, bool(async_op), q_scale, q_scale is not None, transposed)
            check_vector_matmul(owner, *args, act_dtype=act)
            if grad_enabled():
                no_backward(owner, input=input, weight=weight)
            return impl(*args)

        if checked:
            return slow

        # The compiled backend validates in C++ (q_int8=True included: it needs an int8 weight; grad mode
        # too). Anything C++ rejects reruns through `slow`, whose checks name the argument in dsinf's
        # wording. Every argument passed costs ~0.3 us in torch's op-call parsing: the calls go through
        # the lean entry's arguments (SPEC.lean: a [K, N] float call passes two), to its C++ entry in eager
        # mode, else to the op's own function.
        full_args = SPEC.lean.full_args

        def through_impl(input, weight, transposed_mode=False, q_scale=None):
            if not transposed_mode and q_scale is None:  # [K, N] float: the two arguments it needs
                return impl(input, weight)
            return impl(*full_args(input, weight, transposed_mode, q_scale))

        call = lean if lean is not None else through_impl

        def fast_int8(input, weight, async_op=False):
            try:
                return call(input, weight, transposed, weight.scale)
            except CALL_ERRORS:
                pass
            return slow(input, weight, async_op)

        def fast_nk(input, weight, async_op=False):
            try:
                return call(input, weight, True)
            except CALL_ERRORS:
                pass
            return slow(input, weight, async_op)

        def fast_kn(input, weight, async_op=False):
            try:
                return call(input, weight)
            except CALL_ERRORS:
                pass
            return slow(input, weight, async_op)

        return fast_int8 if quantized else fast_nk if transposed else fast_kn

    @staticmethod
    def _triton_autotune(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype: torch.dtype = torch.float16,
                         **kwargs):
        """Warm the persisted Triton autotune table for [hidden] -> [hidden] (needs CUDA and triton).
        `dtype` is the weight dtype (torch.int8: weight-only); keywords go to
        `dsinf.triton.autotune_vector_matmul` (transposed_mode, act_dtype, out_features, ...)."""
        return importlib.import_module("dsinf.triton").autotune_vector_matmul(min_seqlen, max_seqlen, hidden_size,
                                                                              dtype, **kwargs)
