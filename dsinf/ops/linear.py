"""linear_layer: DeepSpeed's `linear_layer` op - `x @ W (+ bias)`, optionally split into per-head q, k, v.

    out[b,s,n] = sum_k x[b,s,k] * W(k,n) (+ bias[n])              -> [out]           ([B, S, N])
    do_flash_attn: row n = [Q | K | V], per head, RoPE on q and k  -> [qkv]           ([3, B, H, S, D])
                   with num_kv < num_heads (GQA)                   -> [q, k, v]       (k, v [B, KV, S, D])
    int8 weights:  W(k,n) = w_int8[n,k] * q_scale[n // (N/G)]

The reference rounds once, at the end. The compiled backends do too, except that above the GEMV's range the
fused QKV split reads a matmul result already rounded to the activation dtype where that GEMM writes it
(CUDA's cuBLAS; bf16 on the CPU module's native bf16 GEMM); the tests' 16-bit tolerances cover it.

The spec (schema, checks, reference, samples), the reference and `LinearOp` live here; RoPE and the
matmul helpers are in `dsinf.reference`. `LinearOp` takes from the config: `transposed_mode`,
`rope_theta`, `rotary_dim` (> 0 enables RoPE), `rotate_half` (NeoX pairs; else GPT-J pairs), `num_kv`,
and `dtype` (int8: weight is int8 `[N, K]` carrying `weight.scale`).
"""
from __future__ import annotations

import importlib

import torch

from ..checks import check_int, check_linear, linear_output_shapes, no_backward
from ..reference import matmul_fp32, split_qkv
from .base import CALL_ERRORS, InferenceOp, eager_call
from .spec import LeanEntry, OpSpec


def linear_layer(input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode=False,
                 rope_theta=10000.0, rotary_dim=-1, rotate_half=False, num_kv=-1, seq_offset=0,
                 q_scale=None, *, op: str = "linear_layer") -> list[torch.Tensor]:
    """The reference: float32 matmul (+ bias), then the per-head split with RoPE; rounded once."""
    shape, qkv = check_linear(op, input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode,
                              rope_theta, rotary_dim, rotate_half, num_kv, seq_offset, q_scale)
    out = matmul_fp32(input, weight, shape, q_scale)
    if add_bias:
        out = out + bias.to(torch.float32)
    if qkv is None:
        return [out.to(input.dtype)]
    return split_qkv(out, qkv, input.dtype)


def _samples(device, dtype, gen):
    x = torch.randn(2, 3, 64, generator=gen).to(device, dtype)
    w = torch.randn(64, 192, generator=gen).to(device, dtype)
    b = torch.randn(192, generator=gen).to(device, dtype)
    w_gqa = torch.randn(128, 64, generator=gen).to(device, dtype)  # [N, K]: 4 heads of 16, 2 kv heads
    b_gqa = torch.randn(128, generator=gen).to(device, dtype)
    return [(x, w, b, True, True, 4), (x, w, b, True, False, 1),
            (x[:, :1], w_gqa, b_gqa, True, True, 4, True, 10000.0, 16, True, 2, 5)]


SPEC = OpSpec(
    name="linear_layer",
    schema=("(Tensor input, Tensor weight, Tensor? bias, bool add_bias, bool do_flash_attn, int num_heads, "
            "bool transposed_mode=False, float rope_theta=10000.0, int rotary_dim=-1, bool rotate_half=False, "
            "int num_kv=-1, int seq_offset=0, Tensor? q_scale=None) -> Tensor[]"),
    reference=linear_layer,
    check=check_linear,
    output_shapes=lambda problem: linear_output_shapes(*problem),
    samples=_samples,
    op_class="LinearOp",
    triton="linear_layer",
    lean=LeanEntry(  # LinearOp's plain matmul (+ bias) in eager mode
        schema="(Tensor input, Tensor weight, Tensor? bias=None, bool transposed_mode=False) -> Tensor",
        full_args=lambda input, weight, bias=None, transposed_mode=False: (
            input, weight, bias, bias is not None, False, 0, transposed_mode)),
)


class LinearOp(InferenceOp):
    OP = "linear_layer"

    def forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add_bias: bool,
                do_flash_attn: bool, num_heads: int, external_cache=None, num_layers=None, *,
                seq_offset: int = 0) -> list[torch.Tensor]:
        """`out = input @ W (+ bias)` -> a LIST: `[out]` (`[B, S, N]`), or with `do_flash_attn` the row
        split per head into `[qkv]` (`[3, B, H, S, D]`, RoPE on q and k when `config.rotary_dim` > 0), or
        `[q, k, v]` (k, v `[B, KV, S, D]`) when `config.num_kv` < `num_heads` (GQA).

        `input` is `[B, S, K]`; the weight layout follows `config.transposed_mode` as for VectorMatMulOp.
        `external_cache` and `num_layers` are accepted and unused (as in DeepSpeed); `seq_offset` is the
        position of the first token for RoPE (decode step t: t).

        >>> import torch, dsinf
        >>> x, w, b = torch.randn(1, 5, 64), torch.randn(192, 64), torch.randn(192)   # w: [N, K]
        >>> op = dsinf.LinearOp(dsinf.InferenceConfig(dtype=torch.float32, transposed_mode=True))
        >>> [y] = op(x, w, b, True, False, 4)
        >>> y.shape
        torch.Size([1, 5, 192])
        >>> [qkv] = op(x, w, b, add_bias=True, do_flash_attn=True, num_heads=4)
        >>> qkv.shape                                                  # [3, B, H, S, D]
        torch.Size([3, 1, 4, 5, 16])
        """
        """DeepSpeed's signature. `external_cache` and `num_layers` are accepted and unused (as in
        DeepSpeed); `seq_offset` (ours) is the position of the first token for RoPE (decode step t: t)."""
        return self._call(input)(input, weight, bias, add_bias, do_flash_attn, num_heads, seq_offset)

    def __call__(self, input, weight, bias, add_bias, do_flash_attn, num_heads, external_cache=None, num_layers=None,
                 *, seq_offset=0):
        call = eager_call(self, input)
        if call is None:
            return super().__call__(input, weight, bias, add_bias, do_flash_attn, num_heads, external_cache,
                                    num_layers, seq_offset=seq_offset)
        return call(input, weight, bias, add_bias, do_flash_attn, num_heads, seq_offset)

    def _bind(self, impl, checked, lean=None):
        owner, cfg = type(self).__name__, self.config
        quantized, act = cfg.quantized, cfg.activation_dtype
        rope = (cfg.transposed_mode, cfg.rope_theta, cfg.rotary_dim, cfg.rotate_half, cfg.num_kv)
        defaults = (False, 10000.0, -1, False, -1)  # the schema's, for the same arguments
        rope_short = rope
        while rope_short and rope_short[-1] == defaults[len(rope_short) - 1]:
            rope_short = rope_short[:-1]  # trailing defaults left to the schema
        int8, grad_enabled = torch.int8, torch.is_grad_enabled

        def slow(input, weight, bias, add_bias, do_flash_attn, num_heads, seq_offset):
            q_scale = self._q_scale(weight)
            if num_heads is not None:
                check_int(owner, "num_heads", num_heads)
            check_int(owner, "seq_offset", seq_offset)
            args = (input, weight, bias, bool(add_bias), bool(do_flash_attn), num_heads, *rope, seq_offset, q_scale)
            check_linear(owner, *args, act_dtype=act)
            if grad_enabled():
                no_backward(owner, input=input, weight=weight, bias=bias)
            if num_heads is None:  # allowed without do_flash_attn; the compiled schema wants an int
                args = args[:5] + (0,) + args[6:]
            return impl(*args)

        if checked:
            return slow

        # The compiled backend validates in C++ (grad mode included); Python checks only what C++ cannot
        # see: an int8 config's weight dtype, and bools passed as ints (C++ reads True as 1). Anything C++
        # rejects reruns through `slow`, whose checks name the argument. Each argument passed costs ~0.3 us
        # in torch's op-call parsing, so trailing schema defaults are left out when seq_offset is 0.
        def fast_int8(input, weight, bias, add_bias, do_flash_attn, num_heads, seq_offset):
            try:
                if type(num_heads) is int and type(seq_offset) is int and weight.dtype is int8:
                    return impl(input, weight, bias, add_bias, do_flash_attn, num_heads, *rope, seq_offset,
                                weight.scale)
            except CALL_ERRORS:
                pass
            return slow(input, weight, bias, add_bias, do_flash_attn, num_heads, seq_offset)

        transposed = cfg.transposed_mode

        def fast(input, weight, bias, add_bias, do_flash_attn, num_heads, seq_offset):
            # (an int8 weight here has no q_scale: C++ rejects it, and `slow` names the config mismatch)
            try:
                if type(num_heads) is int and type(seq_offset) is int:
                    # The lean entry takes the bias it is given: only calls whose bias agrees with add_bias
                    # (a bias with add_bias=False is still checked for grad, by the full entry).
                    if do_flash_attn is False and lean is not None:
                        if add_bias is True and bias is not None:
                            return [lean(input, weight, bias, transposed)]
                        if add_bias is False and bias is None:
                            return [lean(input, weight, None, transposed)]
                    if seq_offset == 0:
                        return impl(input, weight, bias, add_bias, do_flash_attn, num_heads, *rope_short)
                    return impl(input, weight, bias, add_bias, do_flash_attn, num_heads, *rope, seq_offset)
            except CALL_ERRORS:
                pass
            return slow(input, weight, bias, add_bias, do_flash_attn, num_heads, seq_offset)

        return fast_int8 if quantized else fast

    def _autotune_out_features(self) -> int | None:
        cfg = self.config  # GQA: q|k|v is (heads + 2*num_kv) * D wide, not the default 3 * hidden
        if cfg.num_kv > 0 and cfg.heads > 0 and cfg.hidden_size > 0:
            return (cfg.heads + 2 * cfg.num_kv) * (cfg.hidden_size // cfg.heads)
        return None

    @staticmethod
    def _triton_autotune(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype: torch.dtype = torch.float16,
                         **kwargs):
        """Warm the persisted Triton autotune table for [hidden] -> [3 * hidden] (needs CUDA and triton).
        `dtype` is the weight dtype (torch.int8: weight-only); keywords go to `dsinf.triton.autotune_linear`
        (transposed_mode, act_dtype, out_features, ...)."""
        return importlib.import_module("dsinf.triton").autotune_linear(min_seqlen, max_seqlen, hidden_size, dtype,
                                                                       **kwargs)
