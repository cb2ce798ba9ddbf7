"""The injected linear modules: `nn.Linear`'s math on dsinf's ops, over nn.Linear's own weight layout.

    InjectedLinear:  y[..., n] = sum_k x[..., k] * W[n, k] (+ b[n])          W is [N, K] (transposed_mode=True)
    InjectedQKV:     the same over q|k|v rows, split per head (+ RoPE) by `linear_layer(do_flash_attn=True)`
    int8:            W[n, k] = weight[n, k] * weight_scale[n // (N / G)]     (weight int8, weight_scale float32 [G])

A float weight is the original `nn.Parameter` (no copy; a tied weight stays tied). An int8 weight is a
frozen int8 parameter and its scales a float32 buffer, so `.to()`, `state_dict()` / `load_state_dict()`
and `torch.save` carry both; the scale is passed to the op explicitly as `q_scale` on every call, so it
cannot get lost the way a `weight.scale` attribute does after `.to()`. `.to(float16)` / `.half()` keep the
scales float32 (they are exact per-channel factors, not activations).

Per-call cost is the point of this file: the backend (`dsinf.dispatch`) is resolved once - at injection
for the weight's device and dtype, again after `.to()` / `.cuda()` - and the chosen callable (for the
compiled backend the `torch.ops.dsinf.*.default` overload) is bound to the module. `forward` is one call
with positional arguments; the compiled bindings validate in C++, so nothing is re-checked in Python.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import routes
from . import graphs
from ..checks import InputError
from ..config import InferenceConfig
from ..ops import LinearOp, VectorMatMulOp
from ..quantize import quantize_int8


def bind_op(op_class, device: torch.device, act_dtype: torch.dtype, int8: bool, use_triton: bool, **config):
    """(decision, callable) for `op_class` on `device` with activations `act_dtype` (`config`: more
    InferenceConfig fields, e.g. MLPGemmOp's norm_type)."""
    config = InferenceConfig(dtype=torch.int8 if int8 else act_dtype, act_dtype=act_dtype if int8 else None,
                             transposed_mode=True, use_triton=use_triton, **config)
    decision = op_class(config).resolve(device)
    impl = decision.impl
    # OpOverloadPacket -> its one overload: skips the packet's overload resolution on every call.
    return decision, getattr(impl, "default", impl) if isinstance(impl, torch._ops.OpOverloadPacket) else impl


class InjectedLinear(nn.Module):
    """`nn.Linear` on dsinf's `vector_matmul` (no bias) or `linear_layer` (bias), float or int8 weights.

    Build it with `from_linear` (an existing layer) or `from_weight` (a fused, concatenated weight).
    `backend` / `decision` say which backend runs. A fused weight names its source layers and their row
    counts in `parts` (e.g. `(("gate_proj", I), ("up_proj", I))`), for `export_state_dict`.
    """

    parts: tuple[tuple[str, int], ...] = ()

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, scale: torch.Tensor | None,
                 act_dtype: torch.dtype, use_triton: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.register_buffer("weight_scale", scale)
        self.use_triton = use_triton
        self._act_dtype = act_dtype
        self.decision = None
        self._fn = None
        self.bind(weight.device, act_dtype)

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, quantize: str | None = None,
                    groups: int | None = None, use_triton: bool = False, **extra):
        """Wrap a float `[N, K]` weight; `quantize="int8"` stores it as int8 with `groups` scales (None:
        per output channel). A `weight` that is already an `nn.Parameter` is kept as is (not copied)."""
        act_dtype = weight.dtype
        if quantize == "int8":
            q = quantize_int8(weight.detach(), groups, transposed_mode=True)
            weight, scale = nn.Parameter(q, requires_grad=False), q.scale
        else:
            scale = None
            if not isinstance(weight, nn.Parameter):
                weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().contiguous(), requires_grad=False)
        return cls(weight, bias, scale, act_dtype, use_triton, **extra)  # kept Parameters: see __setattr__

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    # --- backend ----------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.weight_scale is not None

    @property
    def backend(self) -> str:
        """'compiled', 'triton' or 'torch': the backend bound for the current device and dtype."""
        return self.decision.backend

    def _op_class(self):
        return VectorMatMulOp if self.bias is None else LinearOp

    def bind(self, device: torch.device, act_dtype: torch.dtype) -> None:
        """Resolve the backend for `device` / `act_dtype` once and bind its callable (not per call)."""
        self._act_dtype = act_dtype
        self.decision, self._fn = bind_op(self._op_class(), torch.device(device), act_dtype, self.quantized,
                                        self.use_triton)
        self.follow_routes()

    def follow_routes(self) -> None:
        """Re-read the measured routes (after tuning) and rebuild the per-call function; the backend stays.
        "aten": a float shape the routes send to ATen for every M (CUDA) calls torch's own linear directly -
        the same cuBLAS kernel the binding would pick, without the custom op's host cost."""
        self.route = "aten" if (type(self) is InjectedLinear and not self.quantized
                                and self.decision.backend == "compiled" and self.weight.device.type == "cuda"
                                and routes.aten_only("cuda", self._act_dtype, self.in_features, self.out_features)) \
            else "op"
        self._call = self._make_call()
        graphs.invalidate()  # a captured decode graph holds the old call's kernels and addresses

    def __setattr__(self, name, value):
        if name in ("weight", "bias") and isinstance(value, nn.Parameter):
            # Inference modules: a kept or reassigned Parameter stops requiring grad (the ops have no
            # backward, and the bindings refuse a grad-requiring tensor in grad mode).
            value.requires_grad_(False)
        super().__setattr__(name, value)
        if name in ("weight", "bias", "weight_scale") and self.__dict__.get("_fn") is not None:
            self._call = self._make_call()  # the hot path holds the tensors themselves (see _make_call)
            graphs.invalidate()

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half(): keep int8 scales float32 (only their device follows), then re-bind for
        # the new device and activation dtype - learned by passing a probe through the same `fn`.
        scale = self.weight_scale
        probe = fn(torch.empty((), dtype=self._act_dtype, device=self.weight.device))
        super()._apply(fn, recurse)
        if scale is not None and self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        self.bind(probe.device, probe.dtype)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fn"] = state["_call"] = state["decision"] = None  # this process's callables; re-bound on load
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.bind(self.weight.device, self._act_dtype)

    def extra_repr(self) -> str:
        kind = f"int8 ({self.weight_scale.numel()} scales)" if self.quantized else str(self.weight.dtype)
        backend = self.decision.backend if self.decision is not None else "unbound"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={kind}, backend={backend}")

    # --- the hot path -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x)

    def _make_call(self):
        """The per-call function: a closure over the bound op and this module's tensors, so a call costs one
        Python frame and the op - no nn.Module attribute lookups (several us each on a busy host). Rebuilt
        whenever `bind` runs or weight / bias / weight_scale is reassigned; `load_state_dict` copies in place.
        Positional arguments are the dsinf:: schemas':
            vector_matmul(input, weight, async_op, q_scale, q_int8, transposed_mode)
            linear_layer(input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode,
                         rope_theta, rotary_dim, rotate_half, num_kv, seq_offset, q_scale)"""
        fn, weight, bias, scale = self._fn, self.weight, self.bias, self.weight_scale
        K, N, int8 = self.in_features, self.out_features, scale is not None
        if getattr(self, "route", "op") == "aten":
            linear = torch.nn.functional.linear
            return lambda x: linear(one_gemm_input(x), weight, bias)
        if bias is None:
            def matmul(x3):
                return fn(x3, weight, False, scale, int8, True)
        else:
            def matmul(x3):
                return fn(x3, weight, bias, True, False, 0, True, 10000.0, -1, False, -1, 0, scale)[0]

        def call(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 3:
                return matmul(x)  # the op validates x, naming it
            if x.dim() == 0 or x.shape[-1] != K:  # before the reshape, whose error would not name the input
                raise InputError("InjectedLinear", "input", f"expected [..., {K}] (in_features), got shape "
                                 f"{tuple(x.shape)}")
            return matmul(x.reshape(1, -1, K)).reshape(*x.shape[:-1], N)
        return call


def one_gemm_input(x: torch.Tensor) -> torch.Tensor:
    """`x` for torch's linear on a frozen weight: a 3-D input whose leading dims are not contiguous (HF's head
    takes `hidden[:, -1:, :]`, a prompt's last token per row) made contiguous. torch's matmul folds
    [B, S, K] @ [K, N] into one GEMM when the weight requires grad or the leading dims are contiguous; with
    the weight frozen (inject freezes every parameter) it runs a batched GEMM over the weight expanded per
    row, reading it B times (a 4096-word head at batch 8: 1.9x as long on CPU). The copy is B rows."""
    if x.dim() == 3 and x.shape[0] > 1 and x.stride(0) != x.stride(1) * x.shape[1]:
        return x.contiguous()
    return x


class InjectedQKV(InjectedLinear):
    """q|k|v projections fused into one `linear_layer(do_flash_attn=True)` call: one GEMM over the
    concatenated `[(H + 2*KV) * D, K]` weight, split per head (GQA: `num_kv` heads for k and v), with
    NeoX-style RoPE (`rotate_half`) at `rope_theta` in the same epilogue when a `seq_offset` is given.

    `forward(x, seq_offset)` returns `(q, k, v)`: q `[B, H, S, D]`, k and v `[B, KV, S, D]` - the layout
    HF's attention takes. `seq_offset=None` skips RoPE (the caller applies its own).
    `parts` names the source projections and their row counts, in order (for `export_state_dict`).
    """

    def __init__(self, weight, bias, scale, act_dtype, use_triton=False, *, num_heads: int, num_kv: int,
                 rope_theta: float, parts: tuple[tuple[str, int], ...]):
        self.num_heads, self.num_kv, self.rope_theta = num_heads, num_kv, float(rope_theta)
        self.parts = parts
        super().__init__(weight, bias, scale, act_dtype, use_triton)
        self.head_dim = self.in_features // num_heads

    def _op_class(self):
        return LinearOp

    def forward(self, x: torch.Tensor, seq_offset: int | None = None):
        return self._call(x, seq_offset)

    def _make_call(self):
        fn, weight, bias, scale = self._fn, self.weight, self.bias, self.weight_scale
        add_bias, heads, kv, theta, head_dim = bias is not None, self.num_heads, self.num_kv, self.rope_theta, \
            self.in_features // self.num_heads

        def call(x: torch.Tensor, seq_offset: int | None):
            if seq_offset is None:
                out = fn(x, weight, bias, add_bias, True, heads, True, theta, -1, True, kv, 0, scale)
            else:
                out = fn(x, weight, bias, add_bias, True, heads, True, theta, head_dim, True, kv, seq_offset, scale)
            return out[0].unbind(0) if len(out) == 1 else out
        return call
