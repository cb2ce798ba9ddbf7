"""Pure-torch reference and input checks of RMSNorm, PreRMSNorm and the RMSNorm gated MLP.

DeepSpeed's op_binding names and argument orders:

    rms_norm(vals, gamma, epsilon)                    -> out
    pre_rms_norm(vals, residual, gamma, epsilon)      -> (out, residual_out)
    rms_mlp_gemm_{fp32,fp16,bf16}(input, residual, weight_interm, weight_out, gamma, epsilon,
                                  q_scale, q_scale1, q_int8, activation_type, transposed_mode)
                                                      -> [output, residual_out]

Math (float32 throughout; a value is rounded to the activation dtype only where a kernel stores it):

    rms_norm:      out = x * rsqrt(mean(x^2) + eps) * gamma                         (rounded once)
    pre_rms_norm:  r = round(vals + residual)   (sum in fp32, rounded to the dtype)
                   out = rms_norm(r), residual_out = r
                   The norm reads the *rounded* sum, as DeepSpeed's CUDA kernel does (it adds in the
                   activation dtype, stores that as the residual and normalises the stored value).
                   DeepSpeed rounds `x * rsqrt` and then `* gamma` separately; we round once.
    rms_mlp_gemm:  r = round(input + residual)                    [.., K]  (returned as residual_out)
                   h = round(rms_norm(r, gamma, eps))             [.., K]
                   t = h @ W_interm  (fp32, not rounded)          [.., 2I]
                   up, gate = t[..., :I], t[..., I:]               (DeepSpeed: the second half gates)
                   a = round(act(gate) * up)                      [.., I]
                   output = round(a @ W_out)                      [.., K]
                   act: GATED_SILU -> silu(g) = g * sigmoid(g); GATED_GELU -> the exact erf GELU
                   0.5 * g * (1 + erf(g / sqrt(2))) (DeepSpeed's gated kernel uses erff, not tanh).
                   h and a are rounded because every kernel path stores them in the activation dtype
                   between the two GEMMs. DeepSpeed also rounds t and act(gate); the fused decode
                   kernel keeps them in fp32.

Layouts (K = hidden, I = intermediate): transposed_mode=False: W_interm [K, 2I], W_out [I, K];
True (nn.Linear): W_interm [2I, K], W_out [K, I]. int8 weights (q_int8=True) are always [N, K]:
W_interm int8 [2I, K] with float32 q_scale [G] (G | 2I), W_out int8 [K, I] with q_scale1 [G1] (G1 | K);
row n of a weight with N rows and G groups is scaled by scale[n // (N / G)].
DeepSpeed updates `residual` in place and returns it; these functions return a new tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from .checks import DTYPE_SUFFIX, InputError, dtype_name


class ActivationFuncType(IntEnum):
    """DeepSpeed's deepspeed.utils.types.ActivationFuncType values (the int passed as activation_type)."""

    UNKNOWN = 0
    GELU = 1
    ReLU = 2
    GATED_GELU = 3
    GATED_SILU = 4


GATED_ACTIVATIONS = (ActivationFuncType.GATED_GELU, ActivationFuncType.GATED_SILU)


@dataclass(frozen=True)
class MLPShape:
    M: int  # rows (product of the leading dims of input)
    K: int  # hidden size
    I: int  # intermediate size (W_interm has 2I outputs)
    int8: bool
    groups: int  # q_scale groups (0 unless int8)
    groups_out: int  # q_scale1 groups (0 unless int8)
    weight_nk: bool  # weights stored [N, K] (transposed_mode or int8)
    activation: ActivationFuncType


def _fail(op: str, arg: str, message: str):
    raise InputError(op, arg, message)


def _check_tensor(op: str, name: str, t, like: torch.Tensor | None = None):
    if not isinstance(t, torch.Tensor):
        _fail(op, name, f"expected a Tensor, got {type(t).__name__}")
    if like is not None and t.device != like.device:
        _fail(op, name, f"is on {t.device} but the input is on {like.device}")


def _check_float_activation(op: str, name: str, t: torch.Tensor, act_dtype):
    if act_dtype is not None and t.dtype != act_dtype:
        _fail(op, name, f"expected dtype {dtype_name(act_dtype)}, got {dtype_name(t.dtype)}")
    if t.dtype not in DTYPE_SUFFIX:
        _fail(op, name, f"dtype {dtype_name(t.dtype)} is not supported (float32, float16, bfloat16)")
    if t.dim() < 1:
        _fail(op, name, "expected at least one dimension [..., H], got a 0-d tensor")


def _check_epsilon(op: str, epsilon):
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        _fail(op, "epsilon", f"expected a float, got {type(epsilon).__name__}")
    if not math.isfinite(epsilon) or epsilon <= 0:
        _fail(op, "epsilon", f"must be finite and > 0, got {epsilon}")


def _check_gamma(op: str, gamma, vals: torch.Tensor):
    _check_tensor(op, "gamma", gamma, vals)
    H = vals.shape[-1]
    if gamma.dtype != vals.dtype:
        _fail(op, "gamma", f"expected dtype {dtype_name(vals.dtype)} (same as the input), got {dtype_name(gamma.dtype)}")
    if gamma.dim() != 1 or gamma.shape[0] != H:
        _fail(op, "gamma", f"expected shape ({H},) to match the hidden size H={H}, got {tuple(gamma.shape)}")


def check_rms_norm(op: str, vals, gamma, epsilon, act_dtype=None, name: str = "vals") -> int:
    """Validate rms_norm's arguments; returns the hidden size H."""
    _check_tensor(op, name, vals)
    _check_float_activation(op, name, vals, act_dtype)
    _check_gamma(op, gamma, vals)
    _check_epsilon(op, epsilon)
    return vals.shape[-1]


def check_pre_rms_norm(op: str, vals, residual, gamma, epsilon, act_dtype=None,
                       names: tuple[str, str] = ("vals", "residual")) -> int:
    """Validate pre_rms_norm's arguments (`names`: what the op calls its two activations); returns H."""
    x, r = names
    H = check_rms_norm(op, vals, gamma, epsilon, act_dtype, name=x)
    _check_tensor(op, r, residual, vals)
    if residual.dtype != vals.dtype:
        _fail(op, r, f"expected dtype {dtype_name(vals.dtype)} (same as {x}), got {dtype_name(residual.dtype)}")
    if residual.shape != vals.shape:
        _fail(op, r, f"expected shape {tuple(vals.shape)} (same as {x}), got {tuple(residual.shape)}")
    return H


def _check_scale(op: str, name: str, q_scale, input: torch.Tensor, N: int, weight_name: str) -> int:
    if not isinstance(q_scale, torch.Tensor) or q_scale.numel() == 0:
        _fail(op, name, f"q_int8=True needs the float32 scales of {weight_name}")
    if q_scale.dtype != torch.float32:
        _fail(op, name, f"expected dtype float32, got {dtype_name(q_scale.dtype)}")
    if q_scale.device != input.device:
        _fail(op, name, f"is on {q_scale.device} but the input is on {input.device}")
    if q_scale.dim() != 1:
        _fail(op, name, f"expected a 1-D [G] tensor, got shape {tuple(q_scale.shape)}")
    if not q_scale.is_contiguous():
        _fail(op, name, "must be contiguous")
    groups = q_scale.shape[0]
    if N % groups != 0:
        _fail(op, name, f"G={groups} groups do not divide the N={N} rows of {weight_name}")
    return groups


def _check_weight(op: str, name: str, w, input: torch.Tensor, q_int8: bool):
    _check_tensor(op, name, w, input)
    if w.dim() != 2:
        _fail(op, name, f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        _fail(op, name, "must be contiguous (call .contiguous() once at load time, not per call)")
    if q_int8 and w.dtype != torch.int8:
        _fail(op, name, f"q_int8=True needs an int8 weight, got {dtype_name(w.dtype)}")
    if not q_int8 and w.dtype != input.dtype:
        hint = ": pass q_int8=True with its scales" if w.dtype == torch.int8 else ""
        _fail(op, name, f"expected dtype {dtype_name(input.dtype)} (same as input), got {dtype_name(w.dtype)}{hint}")


def check_rms_mlp_gemm(op: str, input, residual, weight_interm, weight_out, gamma, epsilon, q_scale, q_scale1,
                       q_int8, activation_type, transposed_mode, act_dtype=None) -> MLPShape:
    """Validate rms_mlp_gemm's arguments (names and order as DeepSpeed's binding); returns the sizes."""
    _check_tensor(op, "input", input)
    K = check_pre_rms_norm(op, input, residual, gamma, epsilon, act_dtype, names=("input", "residual"))
    try:
        activation = ActivationFuncType(int(activation_type))
    except (TypeError, ValueError):
        activation = None
    if activation not in GATED_ACTIVATIONS:
        _fail(op, "activation_type", f"expected GATED_GELU (3) or GATED_SILU (4) (DeepSpeed's ActivationFuncType), "
                                     f"got {activation_type!r}")
    q_int8 = bool(q_int8)
    _check_weight(op, "weight_interm", weight_interm, input, q_int8)
    _check_weight(op, "weight_out", weight_out, input, q_int8)
    weight_nk = q_int8 or bool(transposed_mode)
    layout = "[N, K]" if weight_nk else "[K, N]"
    Kw, N = (weight_interm.shape[1], weight_interm.shape[0]) if weight_nk else tuple(weight_interm.shape)
    if Kw != K:
        _fail(op, "weight_interm", f"shape {tuple(weight_interm.shape)} read as {layout} has K={Kw}, but the input "
                                   f"has hidden size {K} (transposed_mode={bool(transposed_mode)}, q_int8={q_int8})")
    if N % 2 != 0 or N == 0:
        _fail(op, "weight_interm", f"its {N} outputs must be an even, non-zero 2*I ([up | gate] halves)")
    I = N // 2
    Kout, Iout = tuple(weight_out.shape) if weight_nk else (weight_out.shape[1], weight_out.shape[0])
    if Iout != I or Kout != K:
        want = (K, I) if weight_nk else (I, K)
        _fail(op, "weight_out", f"expected shape {want} ({layout} with K={K} outputs and I={I} inputs), "
                                f"got {tuple(weight_out.shape)}")
    groups = groups_out = 0
    if q_int8:
        groups = _check_scale(op, "q_scale", q_scale, input, N, "weight_interm")
        groups_out = _check_scale(op, "q_scale1", q_scale1, input, K, "weight_out")
    M = input.numel() // K if K else 0
    return MLPShape(M=M, K=K, I=I, int8=q_int8, groups=groups, groups_out=groups_out, weight_nk=weight_nk,
                    activation=activation)


# ---------------------------------------------------------------------------------------------- math

def _rms_norm_fp32(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> torch.Tensor:
    """float32 in, float32 out."""
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    return x * inv * gamma.to(torch.float32)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] + float32 [G] -> float32 [N, K]."""
    rows_per_group = weight.shape[0] // scale.shape[0]
    return weight.to(torch.float32) * scale.repeat_interleave(rows_per_group)[:, None]


def _weight_kn(weight: torch.Tensor, scale, shape: MLPShape) -> torch.Tensor:
    """Any stored layout -> float32 [K_in, N_out] (the matrix x is multiplied by)."""
    if shape.int8:
        return _dequantize(weight, scale).t()
    w = weight.to(torch.float32)
    return w.t() if shape.weight_nk else w


def gated_activation(t: torch.Tensor, activation: ActivationFuncType) -> torch.Tensor:
    """float32 [.., 2I] -> act(gate) * up, float32 [.., I]; up = first half, gate = second half."""
    up, gate = t.chunk(2, dim=-1)
    if activation == ActivationFuncType.GATED_SILU:
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="none") * up


def rms_norm(vals, gamma, epsilon, *, op: str = "rms_norm") -> torch.Tensor:
    check_rms_norm(op, vals, gamma, epsilon)
    return _rms_norm_fp32(vals.to(torch.float32), gamma, epsilon).to(vals.dtype)


def pre_rms_norm(vals, residual, gamma, epsilon, *, op: str = "pre_rms_norm") -> tuple[torch.Tensor, torch.Tensor]:
    check_pre_rms_norm(op, vals, residual, gamma, epsilon)
    res = (vals.to(torch.float32) + residual.to(torch.float32)).to(vals.dtype)
    return _rms_norm_fp32(res.to(torch.float32), gamma, epsilon).to(vals.dtype), res


def rms_mlp_gemm(input, residual, weight_interm, weight_out, gamma, epsilon, q_scale=None, q_scale1=None,
                 q_int8=False, activation_type=ActivationFuncType.GATED_SILU, transposed_mode=False, *,
                 act_dtype=None, op: str = "rms_mlp_gemm") -> list[torch.Tensor]:
    shape = check_rms_mlp_gemm(op, input, residual, weight_interm, weight_out, gamma, epsilon, q_scale, q_scale1,
                               q_int8, activation_type, transposed_mode, act_dtype)
    dtype = input.dtype
    res = (input.to(torch.float32) + residual.to(torch.float32)).to(dtype)
    h = _rms_norm_fp32(res.to(torch.float32), gamma, epsilon).to(dtype)
    t = h.to(torch.float32) @ _weight_kn(weight_interm, q_scale, shape)
    a = gated_activation(t, shape.activation).to(dtype)
    out = (a.to(torch.float32) @ _weight_kn(weight_out, q_scale1, shape)).to(dtype)
    return [out, res]
