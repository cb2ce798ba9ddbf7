"""int8 weight-only quantization: float weight -> (int8 [N, K], float32 scales [G]) and back.

Symmetric, round-to-nearest (ties to even), per row block:

    rows g*N/G ... (g+1)*N/G - 1 share   scale[g] = max|w[rows, :]| / 127   (1.0 for an all-zero block)
    q[n, k] = clamp(round(w[n, k] / scale[n // (N/G)]), -127, 127)
    dequantized w[n, k] = q[n, k] * scale[n // (N/G)]           (error <= scale/2 per element)

`G == N` (the default) is per output channel. int8 weights are always `[N, K]` in this project (one row
per output channel), whatever `transposed_mode` says; `transposed_mode` only tells `quantize_int8` how the
*float* weight it is given is laid out (`False`: `[K, N]`, DeepSpeed's default; `True`: `[N, K]`, nn.Linear).

The scales travel as `q.scale`, DeepSpeed's convention, which `VectorMatMulOp` / `LinearOp` read. A plain
attribute does not survive `.to()` / `.cuda()` (torch returns a new tensor): quantize on the target device,
or move the scale too and re-attach it (`q2 = q.cuda(); q2.scale = q.scale.cuda()`).
"""
from __future__ import annotations

import numbers

import torch

from .checks import InputError
from .reference import dequantize

__all__ = ["quantize_int8", "dequantize_int8"]


def _groups(op: str, groups, N: int) -> int:
    if groups is None:
        return N
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise InputError(op, "groups", f"must be None (per channel) or an int >= 1, got {groups!r}")
    if N % groups:
        raise InputError(op, "groups", f"G={groups} groups do not divide N={N} output rows")
    return int(groups)


def quantize_int8(weight: torch.Tensor, groups: int | None = None, transposed_mode: bool = False) -> torch.Tensor:
    """Quantize a float weight to int8 `[N, K]` with float32 scales `[G]` attached as `.scale`.

    Args:
        weight: floating-point 2-D weight, `[K, N]` (`transposed_mode=False`) or `[N, K]` (`True`).
        groups: number of row blocks G sharing one scale; must divide N. None: G = N (per channel).
        transposed_mode: layout of `weight`, as in `InferenceConfig.transposed_mode`.

    Returns:
        A contiguous int8 `[N, K]` tensor on `weight`'s device, with `.scale` (float32 `[G]`).
    """
    op = "quantize_int8"
    if not isinstance(weight, torch.Tensor):
        raise InputError(op, "weight", f"expected a Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise InputError(op, "weight", f"expected a floating-point tensor, got {weight.dtype}"
                         + (" (already quantized?)" if weight.dtype == torch.int8 else ""))
    if weight.dim() != 2:
        raise InputError(op, "weight", f"expected a 2-D tensor, got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise InputError(op, "weight", "is a meta tensor (no values to quantize): load the weights first")
    if not isinstance(transposed_mode, bool):
        raise InputError(op, "transposed_mode", f"expected True ([N, K]) or False ([K, N]), got {transposed_mode!r}")
    w_nk = weight if transposed_mode else weight.t()
    N, K = w_nk.shape
    G = _groups(op, groups, N)
    if w_nk.numel() == 0:
        raise InputError(op, "weight", f"is empty (shape {tuple(weight.shape)})")
    # float64 keeps float32 inputs exact through the division; the stored scale is float32.
    w = w_nk.to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise InputError(op, "weight", "has non-finite values (inf/nan) and cannot be quantized")
    blocks = w.reshape(G, (N // G) * K)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).to(torch.float32)
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        big = float(absmax.max())
        limit = torch.finfo(torch.float32).max
        raise InputError(op, "weight", f"max |w| = {big:.6g} is outside what float32 scales can represent "
                                       f"(|w| / 127 must be a positive finite float32: at most {limit:.6g}, not 0)")
    q = torch.round(blocks / scale.to(torch.float64)[:, None]).clamp_(-127, 127)
    q = q.to(torch.int8).reshape(N, K).contiguous()
    q.scale = scale.contiguous()
    return q


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor | None = None, *, transposed_mode: bool = False,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight an int8 `[N, K]` weight stands for, laid out as `transposed_mode` says.

    `scale` defaults to `weight.scale`. With the same `transposed_mode`,
    `dequantize_int8(quantize_int8(w, g, tm), transposed_mode=tm)` has `w`'s shape and is within half a
    scale step of `w`. The result is a new contiguous tensor of `dtype`.
    """
    op = "dequantize_int8"
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InputError(op, "weight", f"expected a 2-D int8 [N, K] tensor, got {got}")
    if scale is None:
        scale = getattr(weight, "scale", None)
        if scale is None:
            raise InputError(op, "scale", "not given and the weight has no .scale attribute")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() != 1 or scale.numel() == 0:
        got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise InputError(op, "scale", f"expected a non-empty 1-D float32 [G] tensor, got {got}")
    if scale.device != weight.device:
        raise InputError(op, "scale", f"is on {scale.device} but weight is on {weight.device}")
    N = weight.shape[0]
    if N % scale.shape[0]:
        raise InputError(op, "scale", f"G={scale.shape[0]} groups do not divide N={N} output rows")
    w = dequantize(weight, scale)
    if not transposed_mode:
        w = w.t()
    return w.to(dtype).contiguous()
