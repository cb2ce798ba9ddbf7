"""When dsinf's RoPE may replace the model's: once per model (`decide_rotary`, again after a cast or move of the
model: `WatchedRotary`), then per call (`RopePositions`).

dsinf's fused RoPE (the `linear_layer` epilogue) is NeoX-style rotate_half over the whole head with
    inv_freq[i] = rope_theta ** (-2i / D),   angle = (seq_offset + s) * inv_freq[i],   no output scaling.
A model's rotary equals that only when its rope type is "default" (no llama3 / yarn / dynamic / linear
scaling), its `attention_scaling` is 1.0 and its `inv_freq` buffer *is* theta ** (-2i/D) over the full
head - which `decide_rotary` checks on the model's own rotary module rather than trusting a name.

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


def rotary_module(model: nn.Module, attention: str = "") -> nn.Module | None:
    """The rotary-embedding module (inv_freq + attention_scaling) serving the attention named `attention`: of
    several (a vision tower's beside the text model's), the one in the innermost module holding that
    attention ('model.language_model.rotary_emb' for 'model.language_model.layers.0.self_attn'); else the
    first."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "attention_scaling")]
    if not found:
        return None

    def depth(name: str) -> int:  # components of the rotary's parent that prefix the attention's name
        parent = name.split(".")[:-1]
        return len(parent) if attention.split(".")[:len(parent)] == parent else -1

    return max(found, key=lambda nm: depth(nm[0]))[1]  # max keeps the first of equals


def decide_rotary(rotary: nn.Module | None, config, head_dim: int) -> RopeDecision:
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


class WatchedRotary:
    """Mixed into the model's rotary module when dsinf fuses its RoPE: a cast or move of the model after inject
    (`.to(torch.bfloat16)` rounds HF's float32 `inv_freq`, which HF's rotary then uses) decides again, through
    `RopePositions.recheck`, rather than keep fused frequencies the model no longer has."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        positions = self.__dict__.get("_dsinf_positions")
        if positions is not None:
            positions.recheck(self)
        return out


class RopePositions:
    """Per-model memo: the host `seq_offset` of the current forward step, or None (see the module doc).
    `summary` (the model's InjectionSummary): its RoPE line follows `recheck`. Held as an object, not a
    callback, so a deepcopy of the model updates its own copy."""

    def __init__(self, decision: RopeDecision, config=None, head_dim: int = 0, summary=None):
        self.fused = decision.fused
        self._config, self._head_dim, self._summary = config, head_dim, summary
        self._ids: torch.Tensor | None = None
        self._reader: int | None = None  # id() of the layer that read `_ids`: its next call is a new step
        self._offset: int | None = None

    def __getstate__(self):
        # A copy (pickle, deepcopy) starts a new step: the memo's tensor and layer id belong to this model's calls.
        return {**self.__dict__, "_ids": None, "_reader": None, "_offset": None}

    def recheck(self, rotary: nn.Module) -> None:
        """Decide again on the rotary module as it is now (after a cast or move). Once off, fusion stays off:
        frequencies rounded by a cast stay rounded when cast back (decide_rotary compares their values)."""
        if not self.fused or rotary.inv_freq.is_meta:  # a move to "meta" has no values to decide on
            return
        decision = decide_rotary(rotary, self._config, self._head_dim)
        if not decision.fused:
            self.fused, self._ids = False, None
            if self._summary is not None:
                self._summary.rope_fused = False
                self._summary.rope = f"fused at inject, then the model changed: {decision.reason}"

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
