"""When dsinf's RoPE may replace the model's: once per model (`decide_rope`), then per call (`RopePositions`).

dsinf's fused RoPE (the `linear_layer` epilogue) is NeoX-style rotate_half over the whole head with
    inv_freq[i] = rope_theta ** (-2i / D),   angle = (seq_offset + s) * inv_freq[i],   no output scaling.
A model's rotary equals that only when its rope type is "default" (no llama3 / yarn / dynamic / linear
scaling), its `attention_scaling` is 1.0 and its `inv_freq` buffer *is* theta ** (-2i/D) over the full
head - which `decide_rope` checks on the model's own rotary module rather than trusting a name.

Per call, the op takes one host integer `seq_offset` for all rows, while HF hands the attention a device
tensor `position_ids` `[B or 1, S]`. `RopePositions.offset` turns it into that integer when the rows are
one plain arange `p0 .. p0+S-1` (the usual case: no padding), with one device->host read per forward
step - memoised on the tensor object, which HF passes unchanged to every layer of one step, for the other
layers of that step only: the layer that read it reads again at its next call, so a position buffer the
caller reuses and updates in place (`pos.fill_(t)` in a decode loop) is read every step. It returns
None - and the caller applies HF's rotary from `position_embeddings` - when:
  * positions differ per row (left padding: each row starts at its own position) or are not an arange;
  * the model is being compiled (`torch.compile`: a host read would break the graph; the positions must
    stay a tensor) or a CUDA graph is being captured (a host read is illegal there);
  * no `position_ids` reached the attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RopeDecision:
    """Whether the model's RoPE can run in dsinf's epilogue, and why (or why not)."""
    fused: bool
    reason: str
    theta: float = 10000.0


def _rotary_module(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "attention_scaling"):
            return module
    return None


def decide_rope(model: nn.Module, config, head_dim: int) -> RopeDecision:
    rotary = _rotary_module(model)
    if rotary is None:
        return RopeDecision(False, "no rotary-embedding module (inv_freq + attention_scaling) found")
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return RopeDecision(False, "per-layer-type RoPE parameters: HF's rotary kept")
    rope_type = params.get("rope_type", getattr(rotary, "rope_type", "default"))
    if rope_type != "default":
        return RopeDecision(False, f"rope_type '{rope_type}' rescales the frequencies: HF's rotary kept, "
                                   f"the GEMMs are still fused")
    if float(rotary.attention_scaling) != 1.0:
        return RopeDecision(False, f"attention_scaling={rotary.attention_scaling} != 1.0: HF's rotary kept")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        return RopeDecision(False, "no rope_theta in the config: HF's rotary kept")
    if rotary.inv_freq.dtype != torch.float32:
        return RopeDecision(False, f"inv_freq is {str(rotary.inv_freq.dtype).replace('torch.', '')}: the model was "
                                   f"cast (.to(dtype), .half()), which rounds HF's float32 frequencies, and HF's "
                                   f"rotary now uses the rounded ones; kept. To fuse, pass dtype= to inject or "
                                   f"load with from_pretrained(dtype=...)")
    inv_freq = rotary.inv_freq.detach().float().cpu()
    expected = float(theta) ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if inv_freq.shape != expected.shape:
        return RopeDecision(False, f"rotary covers {2 * inv_freq.numel()} of {head_dim} head dims (partial "
                                   f"rotary): HF's rotary kept")
    if not torch.allclose(inv_freq.double(), expected, rtol=1e-5, atol=0):
        return RopeDecision(False, f"inv_freq is not rope_theta ** (-2i/D) for theta={theta}: HF's rotary kept")
    return RopeDecision(True, f"default RoPE, theta={float(theta):g}: fused into the q|k|v epilogue "
                              f"(eager calls with one position range for all rows; HF's rotary otherwise)",
                        float(theta))


class RopePositions:
    """Per-model memo: the host `seq_offset` of the current forward step, or None (see the module doc)."""

    def __init__(self, decision: RopeDecision):
        self.fused = decision.fused
        self._ids: torch.Tensor | None = None
        self._reader: int | None = None  # id() of the layer that read `_ids`: its next call is a new step
        self._offset: int | None = None

    def offset(self, position_ids: torch.Tensor | None, seq_len: int, layer: object) -> int | None:
        """`layer`: the calling attention module. The memo serves the other layers of the step that read it."""
        if not self.fused or position_ids is None or torch.compiler.is_compiling():
            return None
        if position_ids is self._ids and id(layer) != self._reader:
            return self._offset
        if position_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            self._ids = None  # nothing read: no later layer may take an earlier step's offset into the graph
            return None
        self._ids, self._reader, self._offset = position_ids, id(layer), _plain_offset(position_ids, seq_len)
        return self._offset


def _plain_offset(position_ids: torch.Tensor, seq_len: int) -> int | None:
    """p0 when every row of `position_ids` is p0, p0+1, ..., p0+seq_len-1; else None (one host read)."""
    ids = position_ids.reshape(-1, position_ids.shape[-1])
    if ids.shape[-1] != seq_len:
        return None
    start = ids[:1, :1]
    steps = torch.arange(seq_len, device=ids.device, dtype=ids.dtype)
    plain = (ids == start + steps).all()
    plain_flag, p0 = torch.stack((plain.to(ids.dtype), start.reshape(()))).tolist()
    return int(p0) if plain_flag and p0 >= 0 else None
