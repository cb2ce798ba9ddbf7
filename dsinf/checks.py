"""Input validation shared by every Python backend, the op classes and the fake (meta) kernels.

`check_linear` / `check_vector_matmul` turn raw arguments into a small frozen problem description
(sizes, layout, quantization) or raise `InputError` naming the offending argument. The compiled
bindings enforce the same rules in C++ (`csrc/inference/binding/`: primitives in validate.h, the rules
both bindings of an op share in op_rules.h) with the same wording, so a direct `torch.ops.dsinf.*` call
is guarded too; `tests/test_checks.py` runs one table of bad inputs against both.

Integer arguments are range-checked (type and int64 range) before any arithmetic; dtypes are named
as `dtype_name` names them ("float16", never "Half"), in C++ too. `no_backward` is the inference-only
rule every op class applies whatever its backend.

Layouts: `input` is `[B, S, K]`. Float weights are `[K, N]` (`transposed_mode=False`) or
`[N, K]` (`transposed_mode=True`, nn.Linear layout). int8 weights are always `[N, K]` - one row per
output channel, so a row block shares one scale - whatever `transposed_mode` says.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_SUFFIX = {v: k for k, v in FLOAT_DTYPES.items()}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class InputError(ValueError):
    """Bad argument to a dsinf op. `arg` names the argument."""

    def __init__(self, op: str, arg: str, message: str):
        super().__init__(f"{op}: argument '{arg}': {message}")
        self.op = op
        self.arg = arg


@dataclass(frozen=True)
class MatmulShape:
    B: int
    S: int
    K: int
    N: int
    int8: bool  # weight is int8 [N, K] with per-row-block scales
    groups: int  # number of scale groups G (0 when not int8)
    weight_nk: bool  # weight stored [N, K] (nn.Linear layout, always true for int8)

    @property
    def M(self) -> int:
        return self.B * self.S


@dataclass(frozen=True)
class QKVLayout:
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # 0 = no RoPE
    rotate_half: bool
    rope_theta: float
    seq_offset: int
    gqa: bool  # return [q, k, v] rather than one [3, B, H, S, D] tensor


def _fail(op: str, arg: str, message: str):
    raise InputError(op, arg, message)


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: the one spelling of a dtype in every message (C++: validate.h)."""
    return str(dtype).replace("torch.", "")


def check_int(op: str, arg: str, value) -> int:
    """`value` as an int64, or InputError naming `arg` (a str, a float, a bool or an int outside int64)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        _fail(op, arg, f"expected an int, got {type(value).__name__}")
    if isinstance(value, numbers.Integral) and not INT64_MIN <= value <= INT64_MAX:
        _fail(op, arg, f"must fit in int64 [-2**63, 2**63 - 1], got {value}")
    return value


def dense(op: str, arg: str, t: torch.Tensor) -> None:
    """`t` is an ordinary strided tensor: a sparse, mkldnn or nested one would otherwise reach the kernels'
    lookup and fail with torch's words, naming no argument."""
    if t.is_nested:
        _fail(op, arg, "expected a dense (strided) tensor, got a nested tensor")
    if t.layout != torch.strided:
        _fail(op, arg, f"expected a dense (strided) tensor, got layout {str(t.layout).replace('torch.', '')}")


def no_backward(op: str, **tensors) -> None:
    """The ops are inference-only: with grad mode on, an input that requires grad is an error (on every
    backend, so that no backend silently returns a result without a gradient)."""
    for arg, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            _fail(op, arg, "requires grad, but dsinf ops are inference-only (no backward): call them under "
                           "torch.no_grad() or torch.inference_mode(), or detach the tensor")


def _check_matmul(op: str, input, weight, act_dtype, transposed_mode: bool,
                  q_scale, int8_expected: bool | None) -> MatmulShape:
    if not isinstance(input, torch.Tensor):
        _fail(op, "input", f"expected a Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        _fail(op, "weight", f"expected a Tensor, got {type(weight).__name__}")
    dense(op, "input", input)
    dense(op, "weight", weight)
    if input.dim() != 3:
        _fail(op, "input", f"expected a 3-D [B, S, K] tensor, got shape {tuple(input.shape)}")
    if act_dtype is not None and input.dtype != act_dtype:
        _fail(op, "input", f"expected dtype {dtype_name(act_dtype)}, got {dtype_name(input.dtype)}")
    if input.dtype not in DTYPE_SUFFIX:
        _fail(op, "input", f"dtype {dtype_name(input.dtype)} is not supported (float32, float16, bfloat16)")
    if weight.device != input.device:
        _fail(op, "weight", f"is on {weight.device} but input is on {input.device}")
    if weight.dim() != 2:
        _fail(op, "weight", f"expected a 2-D tensor, got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        _fail(op, "weight", "must be contiguous (call .contiguous() once at load time, not per call)")
    B, S, K = input.shape
    is_int8 = weight.dtype == torch.int8
    if int8_expected is True and not is_int8:
        _fail(op, "weight", f"q_int8=True needs an int8 weight, got {dtype_name(weight.dtype)}")
    if int8_expected is False and is_int8:
        _fail(op, "weight", "is int8 but q_int8=False: pass q_int8=True with its q_scale")
    if not is_int8 and weight.dtype != input.dtype:
        _fail(op, "weight", f"expected dtype {dtype_name(input.dtype)} (same as input) or int8, "
                            f"got {dtype_name(weight.dtype)}")
    weight_nk = is_int8 or transposed_mode
    if weight_nk:
        N, Kw = weight.shape
        layout = "[N, K]"
    else:
        Kw, N = weight.shape
        layout = "[K, N]"
    if Kw != K:
        _fail(op, "weight", f"shape {tuple(weight.shape)} read as {layout} has K={Kw}, but input has K={K}"
                            + ("" if is_int8 else f" (transposed_mode={bool(transposed_mode)})"))
    groups = 0
    if is_int8:
        if q_scale is None or not isinstance(q_scale, torch.Tensor) or q_scale.numel() == 0:
            _fail(op, "q_scale", "an int8 weight needs its float32 scales (weight.scale / q_scale)")
        dense(op, "q_scale", q_scale)
        if q_scale.dtype != torch.float32:
            _fail(op, "q_scale", f"expected dtype float32, got {dtype_name(q_scale.dtype)}")
        if q_scale.device != input.device:
            _fail(op, "q_scale", f"is on {q_scale.device} but input is on {input.device}")
        if q_scale.dim() != 1:
            _fail(op, "q_scale", f"expected a 1-D [G] tensor, got shape {tuple(q_scale.shape)}")
        if not q_scale.is_contiguous():
            _fail(op, "q_scale", "must be contiguous")
        groups = q_scale.shape[0]
        if N % groups != 0:
            _fail(op, "q_scale", f"G={groups} groups do not divide N={N} output rows")
    return MatmulShape(B=B, S=S, K=K, N=N, int8=is_int8, groups=groups, weight_nk=weight_nk)


def _check_bias(op: str, bias, add_bias: bool, input, N: int):
    if not add_bias:
        return
    if not isinstance(bias, torch.Tensor):
        _fail(op, "bias", "add_bias=True needs a bias tensor")
    dense(op, "bias", bias)
    if bias.device != input.device:
        _fail(op, "bias", f"is on {bias.device} but input is on {input.device}")
    if bias.dtype != input.dtype:
        _fail(op, "bias", f"expected dtype {dtype_name(input.dtype)} (same as input), got {dtype_name(bias.dtype)}")
    if bias.dim() != 1 or bias.shape[0] != N:
        _fail(op, "bias", f"expected shape ({N},), got {tuple(bias.shape)}")
    if not bias.is_contiguous():
        _fail(op, "bias", "must be contiguous")


def check_qkv(op: str, K: int, N: int, S: int, num_heads: int, num_kv: int, rotary_dim: int,
              rotate_half: bool, rope_theta: float, seq_offset: int) -> QKVLayout:
    """Validate the fused-QKV arguments against input width K, output width N and sequence length S."""
    if num_heads is None:
        _fail(op, "num_heads", f"must be >= 1 with do_flash_attn=True, got {num_heads}")
    for arg, value in (("num_heads", num_heads), ("num_kv", num_kv), ("rotary_dim", rotary_dim),
                       ("seq_offset", seq_offset)):
        check_int(op, arg, value)
    if num_heads < 1:
        _fail(op, "num_heads", f"must be >= 1 with do_flash_attn=True, got {num_heads}")
    if num_heads > K:
        _fail(op, "num_heads", f"must be <= the input hidden size K={K}, got {num_heads}")
    if K % num_heads != 0:
        _fail(op, "num_heads", f"input hidden size K={K} is not divisible by num_heads={num_heads}")
    D = K // num_heads
    kv = num_heads if num_kv == -1 else num_kv
    if kv < 1 or kv > num_heads or num_heads % kv != 0:
        _fail(op, "num_kv", f"must be -1 or a divisor of num_heads={num_heads}, got {num_kv}")
    if N != (num_heads + 2 * kv) * D:
        _fail(op, "weight", f"output width N={N} does not hold q|k|v: expected (num_heads + 2*num_kv) * D = "
                            f"({num_heads} + 2*{kv}) * {D} = {(num_heads + 2 * kv) * D}")
    rd = 0 if rotary_dim <= 0 else int(rotary_dim)
    if rd:
        if rd % 2:
            _fail(op, "rotary_dim", f"must be even, got {rd}")
        if rd > D:
            _fail(op, "rotary_dim", f"must be <= head size D={D}, got {rd}")
        if not rope_theta > 0:
            _fail(op, "rope_theta", f"must be > 0, got {rope_theta}")
    if seq_offset < 0 or seq_offset > INT64_MAX - S:
        _fail(op, "seq_offset", f"must be >= 0 with seq_offset + S <= 2**63 - 1 (S={S}), got {seq_offset}")
    return QKVLayout(heads=num_heads, kv_heads=kv, head_dim=D, rotary_dim=rd, rotate_half=bool(rotate_half),
                     rope_theta=float(rope_theta), seq_offset=int(seq_offset), gqa=kv != num_heads)


def check_linear(op: str, input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode=False,
                 rope_theta=10000.0, rotary_dim=-1, rotate_half=False, num_kv=-1, seq_offset=0,
                 q_scale=None, act_dtype=None) -> tuple[MatmulShape, QKVLayout | None]:
    shape = _check_matmul(op, input, weight, act_dtype, transposed_mode, q_scale, None)
    _check_bias(op, bias, add_bias, input, shape.N)
    qkv = None
    if do_flash_attn:
        qkv = check_qkv(op, shape.K, shape.N, shape.S, num_heads, num_kv, rotary_dim, rotate_half, rope_theta,
                        seq_offset)
    return shape, qkv


def check_vector_matmul(op: str, input, weight, async_op=False, q_scale=None, q_int8=False,
                        transposed_mode=False, act_dtype=None) -> MatmulShape:
    return _check_matmul(op, input, weight, act_dtype, transposed_mode, q_scale, bool(q_int8))


def linear_output_shapes(shape: MatmulShape, qkv: QKVLayout | None) -> list[tuple[int, ...]]:
    """Shapes of the tensors linear_layer returns (used by the fake kernels and the tests)."""
    B, S = shape.B, shape.S
    if qkv is None:
        return [(B, S, shape.N)]
    H, KV, D = qkv.heads, qkv.kv_heads, qkv.head_dim
    if qkv.gqa:
        return [(B, H, S, D), (B, KV, S, D), (B, KV, S, D)]
    return [(3, B, H, S, D)]
