"""Llama-family fusions (Llama, Mistral, Qwen2): fused q|k|v(+RoPE) attention and a fused gate|up MLP.

Recognition is structural (`match_attention`, `match_mlp` return a `Match`: ok, or the reason not): the
module's projections, its config, and the helpers of the module that defined its class - never the class
name. `FAMILIES` lists the config `model_type`s whose attention forward we have read and reproduce;
another model with the same attributes (say QK-norm, or a soft-capped attention) keeps its own forward
and only has its linears replaced, with the reason in the summary.

How we keep HF's cache and attention: the attention module keeps its identity, attributes (`config`,
`layer_idx`, `scaling`, `num_key_value_groups`, `is_causal`, ...) and o_proj; only its class is swapped
for a subclass (`Dsinf<Name>`) whose forward replaces the three projections and the rotary with one
`InjectedQKV` call, then runs HF's own code path: `past_key_values.update(k, v, layer_idx)` and the
`ALL_ATTENTION_FUNCTIONS` interface the config selects (sdpa, eager, flash, flex), with the family's
extra arguments (Mistral/Qwen2 `sliding_window`) - except a grouped-query decode step under sdpa, which
runs the same attention without repeating the cache (`attention.decode_attention`). So DynamicCache,
StaticCache, HF's masks, generate, and `isinstance` checks (output capture) all behave as before. Wrapping the projections instead would
have kept HF's forward but could fuse neither the three GEMMs nor the RoPE.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from . import graphs
from .attention import decode_attention
from .linear import InjectedLinear, InjectedQKV, bind_op
from .rope import RopePositions


class Match(NamedTuple):
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Family:
    """What differs between the attention forwards we reproduce: where `sliding_window` comes from."""
    model_type: str
    sliding_window: str | None  # None: not passed; "config": config.sliding_window; "module": attn.sliding_window


FAMILIES = {
    "llama": Family("llama", None),
    "mistral": Family("mistral", "config"),
    "qwen2": Family("qwen2", "module"),
}

_ATTN_ATTRS = ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "is_causal")
_MODELING_HELPERS = ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")  # _dsinf_helpers


def _linears(module: nn.Module, names) -> bool:
    return all(type(getattr(module, n, None)) is nn.Linear for n in names)


def match_attention(module: nn.Module) -> Match:
    if not _linears(module, ("q_proj", "k_proj", "v_proj", "o_proj")):
        return Match(False, "not a q/k/v/o nn.Linear attention")
    missing = [a for a in _ATTN_ATTRS if not hasattr(module, a)]
    if missing:
        return Match(False, f"attention without {', '.join(missing)}")
    extra = sorted(set(dict(module.named_children())) - {"q_proj", "k_proj", "v_proj", "o_proj"})
    if extra:
        return Match(False, f"attention has extra submodules {extra} the fused forward would skip")
    model_type = getattr(module.config, "model_type", None)
    if model_type not in FAMILIES:
        return Match(False, f"model_type {model_type!r} is not a Llama-family attention we reproduce "
                            f"({', '.join(FAMILIES)})")
    modeling = sys.modules.get(type(module).__module__)
    missing = [h for h in _MODELING_HELPERS if not hasattr(modeling, h)]
    if missing:
        return Match(False, f"its modeling module lacks {', '.join(missing)}")
    cfg, D = module.config, module.head_dim
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    K = module.q_proj.in_features
    if heads * D != K:
        return Match(False, f"head_dim {D} * {heads} heads != hidden {K}: the fused split needs D = hidden/heads")
    if (module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features) != (heads * D, kv * D,
                                                                                                kv * D):
        return Match(False, "q/k/v widths do not match num_attention_heads / num_key_value_heads")
    if len({module.q_proj.bias is None, module.k_proj.bias is None, module.v_proj.bias is None}) != 1:
        return Match(False, "q/k/v have mixed biases")
    return Match(True)


def match_mlp(module: nn.Module) -> Match:
    if not _linears(module, ("gate_proj", "up_proj", "down_proj")) or not hasattr(module, "act_fn"):
        return Match(False, "not a gate/up/down MLP")
    extra = sorted(set(dict(module.named_children())) - {"gate_proj", "up_proj", "down_proj", "act_fn"})
    if extra:
        return Match(False, f"MLP has extra submodules {extra}")
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        return Match(False, f"model_type {model_type!r} is not a Llama-family MLP we reproduce")
    act = getattr(module.config, "hidden_act", None)
    if act not in ("silu", "swish"):
        return Match(False, f"hidden_act {act!r} is not SiLU")
    if (module.gate_proj.bias is None) != (module.up_proj.bias is None):
        return Match(False, "gate/up have mixed biases")
    return Match(True)


# --- the fused modules ------------------------------------------------------------------------------

class FusedAttention:
    """Mixed in before the model's own attention class (see the module doc). Set by `fuse_attention`:
    `qkv_proj` (InjectedQKV), `_dsinf_rope` (RopePositions, shared by the model's layers),
    `_dsinf_attn_kwargs` (the family's extra attention-interface arguments), `_dsinf_helpers`."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        apply_rotary, attention_functions, eager_attention = self._dsinf_helpers
        offset = self._dsinf_rope.offset(kwargs.get("position_ids"), hidden_states.shape[1], self)
        query, key, value = self.qkv_proj(hidden_states, offset)
        if offset is None:  # RoPE not fused for this call: the model's own rotary
            cos, sin = position_embeddings
            query, key = apply_rotary(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        dropout = 0.0 if not self.training else self.attention_dropout
        attn_output, attn_weights = decode_attention(self, query, key, value, attention_mask, dropout, kwargs), None
        if attn_output is None:  # not a grouped-query decode step under sdpa: HF's attention interface
            attention = attention_functions.get_interface(self.config._attn_implementation, eager_attention)
            attn_output, attn_weights = attention(self, query, key, value, attention_mask, dropout=dropout,
                                                  scaling=self.scaling, **self._dsinf_attn_kwargs, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    # Pickled without `_dsinf_helpers`, looked up again on load: the model's modeling module's own functions and
    # its ALL_ATTENTION_FUNCTIONS registry, not a copy that would miss what is registered there later.
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_dsinf_helpers", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._dsinf_helpers = _attention_helpers(type(self))


class FusedMLP:
    """Mixed in before the model's own MLP class: `down(silu(gate(x)) * up(x))` with up|gate as one GEMM
    (rows in DeepSpeed's rms_mlp_gemm order, up first, so a fused decoder layer calls that op on the same
    weight). The decoder layer around it, when fused too, never calls this forward (`FusedDecoderLayer`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


class FusedDecoderLayer:
    """Mixed in before the model's own decoder-layer class (Llama family, pre-norm):

        h            = input_layernorm(x)                        RMSNormOp (rms_norm)
        a            = self_attn(h, ...)                         the model's attention (fused or not)
        out, r       = rms_mlp_gemm(a, x, W_up|gate, W_down,     MLPGemmOp: r = a + x, RMSNorm(r) with
                                    post_attention_layernorm)    post_attention_layernorm's weight, up|gate
                                                                 GEMM, SiLU*mul, down GEMM in one op
        return r + out

    which is the model's own forward with its two norms, residual adds and MLP moved onto dsinf's ops
    (float32 norm statistics and scaling rounded once, where HF rounds the normalised value before the
    weight multiply). Set by `fuse_decoder_layer`; `_dsinf_calls` holds the two bound ops (called with the
    layer, whose weights they read) and is re-bound when `.to()` / `.cuda()` / `.half()` changes the device or
    dtype."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        calls = self._dsinf_calls
        if calls is None:  # no compiled kernel for this device/dtype: the model's own forward
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
        norm_in, mlp = calls
        attn, _ = self.self_attn(hidden_states=norm_in(self, hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        out, residual = mlp(self, attn, hidden_states)
        return residual + out

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        bind_decoder_layer(self)
        return self

    # `_dsinf_calls` are closures over this process's bound ops (pickle cannot store them): bound again on load,
    # when the children - whose weights, device and dtype the binding reads - are already restored.
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_dsinf_calls", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        bind_decoder_layer(self)


_subclasses: dict[tuple[type, type], type] = {}


def subclass(mixin: type, cls: type) -> type:
    """The subclass of `cls` with `mixin`'s methods first, made once per (mixin, cls) and named `Dsinf<Name>`
    (a second mixin subclasses the first one's class, under the same name). A mixin may define a static
    `_dsinf_class_made(sub)` to finish the class (graphs.GraphedDecode's forward signature): the one place a
    class is made, so a model unpickled in a fresh process gets the same class inject would make."""
    sub = _subclasses.get((mixin, cls))
    if sub is None:
        name = cls.__name__ if cls.__name__.startswith("Dsinf") else f"Dsinf{cls.__name__}"
        sub = type(name, (mixin, cls), {"__module__": cls.__module__, "_dsinf_origin": (mixin, cls),
                                        "__reduce_ex__": _reduce_ex})
        made = getattr(mixin, "_dsinf_class_made", None)
        if made is not None:
            made(sub)
        _subclasses[(mixin, cls)] = sub
    return sub


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give `module` the subclass of its own class with `mixin`'s methods (`subclass`)."""
    module.__class__ = subclass(mixin, type(module))


def _reduce_ex(self, protocol):
    """Pickle (`torch.save(model)`, `pickle.dumps`) stores a class as module + name, and a class made by
    `subclass` is found under neither: so a module of such a class is stored as its original class (found by
    name) and the mixins, and rebuilt through `subclass` - in this process the very class inject made (the
    `_subclasses` cache: isinstance holds, a second pickle works), in a fresh one the same class made anew.
    The state is the module's own `__getstate__` (the mixins' drop what is bound to this process). Not done by
    publishing the classes under their names: two of them share one (a second mixin keeps the first's name),
    and the module they would go in is the model's, not ours."""
    cls, mixins = type(self), []
    while "_dsinf_origin" in cls.__dict__:  # the class's own entry, not one inherited from a first mixin's class
        mixin, cls = cls.__dict__["_dsinf_origin"]
        mixins.append(mixin)
    return _rebuild, (cls, tuple(reversed(mixins))), self.__getstate__()


def _rebuild(cls: type, mixins: tuple[type, ...]) -> nn.Module:
    """The unpickled module, before its state: an instance of `cls` with `mixins` applied in order."""
    for mixin in mixins:
        cls = subclass(mixin, cls)
    return cls.__new__(cls)


def _attention_helpers(cls: type) -> tuple:
    """(apply_rotary_pos_emb, ALL_ATTENTION_FUNCTIONS, eager_attention_forward) of the module that defined the
    attention's class: at fuse time (`match_attention` checked they exist) and when a fused model is unpickled,
    where the transformers installed may lack one - said, rather than an AttributeError from inside pickle."""
    modeling = sys.modules[cls.__module__]
    missing = [h for h in _MODELING_HELPERS if not hasattr(modeling, h)]
    if missing:
        raise RuntimeError(f"dsinf: cannot restore the fused attention {cls.__name__}: {modeling.__name__} lacks "
                           f"{', '.join(missing)}, which its fused forward calls (another transformers version?); "
                           f"save the model's state_dict() (dsinf.inject.export_state_dict for the original "
                           f"layout) instead of the whole model, and inject the loaded model again")
    return tuple(getattr(modeling, h) for h in _MODELING_HELPERS)


def _cat(tensors):
    return None if tensors[0] is None else torch.cat([t.detach() for t in tensors])


def fuse_attention(module: nn.Module, rope: RopePositions, rope_theta: float, *, quantize, groups,
                   use_triton) -> str:
    """Rewrite a matched attention in place; returns a one-line description for the summary."""
    names = ("q_proj", "k_proj", "v_proj")
    projections = [getattr(module, n) for n in names]
    cfg = module.config
    qkv = InjectedQKV.from_weight(
        _cat([p.weight for p in projections]), _cat([p.bias for p in projections]), quantize=quantize,
        groups=groups, use_triton=use_triton, num_heads=cfg.num_attention_heads, num_kv=cfg.num_key_value_heads,
        rope_theta=rope_theta, parts=tuple((n, p.out_features) for n, p in zip(names, projections)))
    for n in names:
        delattr(module, n)
    module.qkv_proj = qkv
    family = FAMILIES[cfg.model_type]
    extra = {}
    if family.sliding_window == "config":
        extra["sliding_window"] = getattr(cfg, "sliding_window", None)
    elif family.sliding_window == "module":
        extra["sliding_window"] = getattr(module, "sliding_window", None)
    module._dsinf_attn_kwargs = extra
    module._dsinf_helpers = _attention_helpers(type(module))
    module._dsinf_rope = rope
    swap_class(module, FusedAttention)
    gqa = f", GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads" if qkv.num_kv != qkv.num_heads else ""
    bias = ", bias" if qkv.bias is not None else ""
    return f"q|k|v -> one LinearOp{gqa}{bias}" + (", RoPE in its epilogue" if rope.fused else ", HF's rotary")


def fuse_mlp(module: nn.Module, *, quantize, groups, use_triton) -> str:
    gate, up = module.gate_proj, module.up_proj
    module.gate_up_proj = InjectedLinear.from_weight(
        _cat([up.weight, gate.weight]), _cat([up.bias, gate.bias]), quantize=quantize, groups=groups,
        use_triton=use_triton)
    module.gate_up_proj.parts = (("up_proj", up.out_features), ("gate_proj", gate.out_features))
    del module.gate_proj, module.up_proj
    swap_class(module, FusedMLP)
    return "gate|up -> one GEMM + SiLU*mul"


# --- the fused decoder layer ------------------------------------------------------------------------

_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def _rms_norm_match(norm: nn.Module, layer: nn.Module, hidden: int) -> str:
    """'' when `norm` is its family's RMSNorm (`weight * normalised`, weight [hidden], no bias), else why not."""
    if type(norm).__module__ != type(layer).__module__:
        return f"{type(norm).__name__} is not defined beside the layer (not the family's RMSNorm)"
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (hidden,):
        return f"{type(norm).__name__} has no [{hidden}] weight"
    if not isinstance(eps, float) or not eps > 0:
        return f"{type(norm).__name__} has no positive float variance_epsilon"
    if getattr(norm, "bias", None) is not None or list(norm.children()):
        return f"{type(norm).__name__} has a bias or submodules"
    return ""


def match_decoder_layer(layer: nn.Module) -> Match:
    """A pre-norm decoder layer whose MLP was fused (`FusedMLP`) and whose two norms are RMSNorms."""
    if set(dict(layer.named_children())) != _LAYER_CHILDREN:
        return Match(False, f"children {sorted(dict(layer.named_children()))} are not "
                            f"{sorted(_LAYER_CHILDREN)}")
    mlp = layer.mlp
    if not isinstance(mlp, FusedMLP):
        return Match(False, "its MLP is not fused")
    if not isinstance(mlp.down_proj, InjectedLinear):
        return Match(False, "its down_proj is not on dsinf (listed in skip?)")
    if mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
        return Match(False, "the MLP has biases (rms_mlp_gemm has none)")
    if getattr(getattr(layer.self_attn, "config", None), "model_type", None) not in FAMILIES:
        return Match(False, "not a Llama-family layer")
    hidden = mlp.down_proj.out_features
    for name in ("input_layernorm", "post_attention_layernorm"):
        why = _rms_norm_match(getattr(layer, name), layer, hidden)
        if why:
            return Match(False, f"{name}: {why}")
    return Match(True)


def bind_decoder_layer(layer: nn.Module) -> bool:
    """Bind the fused layer's two ops for its current device and dtype; False when no compiled kernel serves
    them there (then the layer runs the model's own forward over the fused MLP: the torch reference of
    rms_mlp_gemm would be slower than that)."""
    from ..config import ActivationFuncType, NormType
    from ..ops import MLPGemmOp, RMSNormOp

    down = layer.mlp.down_proj
    device, act, int8 = down.weight.device, down._act_dtype, down.quantized
    mlp_decision, mlp_fn = bind_op(MLPGemmOp, device, act, int8, down.use_triton, norm_type=NormType.RMSNorm,
                                   mlp_act_func_type=ActivationFuncType.GATED_SILU)
    norm_decision, norm_fn = bind_op(RMSNormOp, device, act, False, down.use_triton)
    if mlp_decision.backend != "compiled" or norm_decision.backend != "compiled":
        layer.__dict__["_dsinf_calls"] = None
        return False
    silu = int(ActivationFuncType.GATED_SILU)

    # Weights are read from the layer passed in, per call: a reassigned or reloaded weight is never stale, and
    # a deepcopy of the model (which copies these functions by reference) computes with its own weights.
    def norm(layer, x):
        n = layer.input_layernorm
        return norm_fn(x, n.weight, n.variance_epsilon)

    def mlp(layer, x, residual):
        n, gate_up, down = layer.post_attention_layernorm, layer.mlp.gate_up_proj, layer.mlp.down_proj
        return mlp_fn(x, residual, gate_up.weight, down.weight, n.weight, n.variance_epsilon,
                      gate_up.weight_scale, down.weight_scale, int8, silu, True)

    layer.__dict__["_dsinf_calls"] = (norm, mlp)
    graphs.invalidate()
    return True


def fuse_decoder_layer(layer: nn.Module) -> str:
    """Swap the layer's class for its `FusedDecoderLayer` subclass and bind it; returns the summary line
    ('' when no compiled kernel serves this device/dtype yet: the layer runs its own forward until a
    `.to()` brings it where one does)."""
    swap_class(layer, FusedDecoderLayer)
    if not bind_decoder_layer(layer):
        return ""
    return "input RMSNorm -> RMSNormOp; residual + post-attention RMSNorm + up|gate GEMM + SiLU*mul + down -> " \
           "one MLPGemmOp (rms_mlp_gemm)"
