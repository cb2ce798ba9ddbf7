"""`export_state_dict`: an injected model's weights in the original (un-injected) module layout.

Fused weights are split back into their source projections (q_proj/k_proj/v_proj, gate_proj/up_proj)
and int8 weights dequantized (`w_int8 * scale`, in the activation dtype, or in `dtype`), so the result loads
into a fresh copy of the original model: the "dequantized-weights model" int8 results are compared against,
or a way back to plain PyTorch. With dtype=torch.float32 the weights are the int8 model's own, unrounded
(in fp16 each `w_int8 * scale` is rounded, which the int8 kernels never do).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quantize import dequantize_int8
from .linear import InjectedLinear


def export_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"export_state_dict: dtype must be a floating torch.dtype or None, got {dtype!r}")
    injected = {name: m for name, m in model.named_modules() if isinstance(m, InjectedLinear)}
    owned = tuple(f"{name}." for name in injected)
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(owned)}
    for name, module in injected.items():
        if module.quantized:
            weight = dequantize_int8(module.weight, module.weight_scale, transposed_mode=True,
                                     dtype=dtype or module._act_dtype)
        else:
            weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        parts = getattr(module, "parts", ())
        if not parts:
            out[f"{name}.weight"] = weight
            if bias is not None:
                out[f"{name}.bias"] = bias
            continue
        parent = name.rpartition(".")[0]
        prefix = f"{parent}." if parent else ""
        sizes = [rows for _, rows in parts]
        weights = weight.split(sizes)
        biases = bias.split(sizes) if bias is not None else [None] * len(parts)
        for (part, _), w, b in zip(parts, weights, biases):
            out[f"{prefix}{part}.weight"] = w.contiguous()
            if b is not None:
                out[f"{prefix}{part}.bias"] = b.contiguous()
    return out
