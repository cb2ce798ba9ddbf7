"""rms_mlp_gemm: DeepSpeed's `rms_mlp_gemm` op - residual add + RMSNorm + gated MLP, the decode hot path of
Llama-family models. `MLPGemmOp` with `norm_type=RMSNorm` calls it.

    r      = round(input + residual)                  [.., K]   returned as the new residual
    h      = round(rms_norm(r, gamma, epsilon))        [.., K]
    t      = h @ W_interm   (float32, not rounded)     [.., 2I]
    up, gate = t[..., :I], t[..., I:]                  (DeepSpeed's order: the second half gates)
    a      = round(act(gate) * up)                     [.., I]
    output = round(a @ W_out)                          [.., K]
    act: GATED_SILU (4) -> silu(g); GATED_GELU (3) -> the exact erf GELU (DeepSpeed's gated kernel uses erff)
    returns [output, r]

h and a are rounded because every kernel path stores them in the activation dtype between the GEMMs; DeepSpeed
also rounds t and act(gate), which the fused decode kernel keeps in float32. Above the gated kernel's range t
is rounded where the matmul writes the activation dtype (CUDA; bf16 on the CPU module's native bf16 GEMM), as
DeepSpeed's is. Layouts (K = hidden, I = intermediate): transposed_mode=False: W_interm [K, 2I], W_out [I, K];
True (nn.Linear): W_interm [2I, K], W_out [K, I]. int8 weights (q_int8=True, config.dtype == torch.int8) are
always [N, K]: W_interm int8 [2I, K] with float32 q_scale [G] (G | 2I), W_out int8 [K, I] with q_scale1 [G1]
(G1 | K); row n of a weight with N rows and G groups is scaled by scale[n // (N / G)]. DeepSpeed writes the
sum into `residual` and returns it; here both outputs are new tensors and no argument is modified.

Decode (CUDA: M <= 8 with int8 or 16-bit [N, K] weights, M <= 2 otherwise; CPU: the GEMV crossover): the
gate/up GEMV writes act(gate) * up from its epilogue, so the [M, 2I] product never reaches memory. Larger M,
and on CUDA a W_interm of 80 MiB or more (16-bit, either layout) or 160 MiB or more (int8) at any M: the
linear ops' matmul into [M, 2I] (our streaming GEMV, or cuBLAS for 16-bit where the route table says; it
reads weights that large faster than the gated kernel), then the gated epilogue, then the W_out matmul.
Those are the compiled rules; a measured route for the gate|up (dsinf.routes.tune_mlp_routes, or
dsinf.inject for a model's fused MLPs) replaces them for its device and shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import InputError, dense, dtype_name, no_backward
from ..config import ActivationFuncType, NormType
from ..reference import dequantize
from .base import CALL_ERRORS, InferenceOp
from .pre_rms_norm import check_pre_rms_norm, residual_sum
from .rms_norm import check_tensor, rms_norm_fp32
from .spec import OpSpec

GATED_ACTIVATIONS = (ActivationFuncType.GATED_GELU, ActivationFuncType.GATED_SILU)


@dataclass(frozen=True)
class MLPShape:
    shape: tuple  # the input's shape [..., K] (both outputs have it)
    K: int  # hidden size
    I: int  # intermediate size (W_interm has 2I outputs)
    int8: bool
    groups: int  # q_scale groups (0 unless int8)
    groups_out: int  # q_scale1 groups (0 unless int8)
    weight_nk: bool  # weights stored [N, K] (transposed_mode or int8)
    activation: ActivationFuncType


def _fail(op: str, arg: str, message: str):
    raise InputError(op, arg, message)


def _check_weight(op: str, name: str, w, input: torch.Tensor, q_int8: bool) -> None:
    check_tensor(op, name, w, input)
    if w.dim() != 2:
        _fail(op, name, f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        _fail(op, name, "must be contiguous (call .contiguous() once at load time, not per call)")
    if q_int8 and w.dtype != torch.int8:
        _fail(op, name, f"q_int8=True needs an int8 weight, got {dtype_name(w.dtype)}")
    if not q_int8 and w.dtype != input.dtype:
        hint = ": pass q_int8=True with its scales" if w.dtype == torch.int8 else ""
        _fail(op, name, f"expected dtype {dtype_name(input.dtype)} (same as input), got {dtype_name(w.dtype)}{hint}")


def _check_scale(op: str, name: str, q_scale, input: torch.Tensor, N: int, weight_name: str) -> int:
    if not isinstance(q_scale, torch.Tensor) or q_scale.numel() == 0:
        _fail(op, name, f"q_int8=True needs the float32 scales of {weight_name}")
    dense(op, name, q_scale)
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


def check_rms_mlp_gemm(op: str, input, residual, weight_interm, weight_out, gamma, epsilon, q_scale=None,
                       q_scale1=None, q_int8=False, activation_type=ActivationFuncType.GATED_SILU,
                       transposed_mode=False, act_dtype=None) -> MLPShape:
    """Validate rms_mlp_gemm's arguments (names and order: DeepSpeed's binding). q_scale / q_scale1 are
    read only with q_int8 (DeepSpeed passes torch.empty(1) otherwise)."""
    check_tensor(op, "input", input)
    K = check_pre_rms_norm(op, input, residual, gamma, epsilon, act_dtype, names=("input", "residual")).H
    try:
        activation = ActivationFuncType(int(activation_type))
    except (TypeError, ValueError, OverflowError):
        activation = None
    if activation not in GATED_ACTIVATIONS:
        _fail(op, "activation_type", f"expected GATED_GELU (3) or GATED_SILU (4) (DeepSpeed's ActivationFuncType), "
                                     f"got {activation_type!r}")
    q_int8 = bool(q_int8)
    _check_weight(op, "weight_interm", weight_interm, input, q_int8)
    _check_weight(op, "weight_out", weight_out, input, q_int8)
    weight_nk = q_int8 or bool(transposed_mode)
    layout = "[N, K]" if weight_nk else "[K, N]"
    N, Kw = weight_interm.shape if weight_nk else reversed(weight_interm.shape)
    if Kw != K:
        _fail(op, "weight_interm", f"shape {tuple(weight_interm.shape)} read as {layout} has K={Kw}, but the input "
                                   f"has hidden size {K} (transposed_mode={bool(transposed_mode)}, q_int8={q_int8})")
    if N % 2 != 0 or N == 0:
        _fail(op, "weight_interm", f"its {N} outputs must be an even, non-zero 2*I ([up | gate] halves)")
    I = N // 2
    Kout, Iout = weight_out.shape if weight_nk else reversed(weight_out.shape)
    if Iout != I or Kout != K:
        want = (K, I) if weight_nk else (I, K)
        _fail(op, "weight_out", f"expected shape {want} ({layout} with K={K} outputs and I={I} inputs), "
                                f"got {tuple(weight_out.shape)}")
    groups = groups_out = 0
    if q_int8:
        groups = _check_scale(op, "q_scale", q_scale, input, N, "weight_interm")
        groups_out = _check_scale(op, "q_scale1", q_scale1, input, K, "weight_out")
    return MLPShape(shape=tuple(input.shape), K=K, I=I, int8=q_int8, groups=groups, groups_out=groups_out,
                    weight_nk=weight_nk, activation=activation)


def gated_activation(t: torch.Tensor, activation: ActivationFuncType) -> torch.Tensor:
    """float32 [.., 2I] -> act(gate) * up, float32 [.., I]; up = first half, gate = second half."""
    up, gate = t.chunk(2, dim=-1)
    if activation == ActivationFuncType.GATED_SILU:
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="none") * up


def _weight_kn(weight: torch.Tensor, scale, shape: MLPShape) -> torch.Tensor:
    """Any stored layout -> float32 [K_in, N_out] (the matrix x is multiplied by)."""
    if shape.int8:
        return dequantize(weight, scale).t()
    w = weight.to(torch.float32)
    return w.t() if shape.weight_nk else w


def rms_mlp_gemm(input, residual, weight_interm, weight_out, gamma, epsilon, q_scale=None, q_scale1=None,
                 q_int8=False, activation_type=ActivationFuncType.GATED_SILU, transposed_mode=False, *,
                 act_dtype=None, op: str = "rms_mlp_gemm") -> list[torch.Tensor]:
    """The reference: float32 math, rounded where every kernel stores (r, h, a, output)."""
    shape = check_rms_mlp_gemm(op, input, residual, weight_interm, weight_out, gamma, epsilon, q_scale, q_scale1,
                               q_int8, activation_type, transposed_mode, act_dtype)
    dtype = input.dtype
    res = residual_sum(input, residual)
    h = rms_norm_fp32(res.to(torch.float32), gamma, epsilon).to(dtype)
    t = h.to(torch.float32) @ _weight_kn(weight_interm, q_scale, shape)
    a = gated_activation(t, shape.activation).to(dtype)
    out = (a.to(torch.float32) @ _weight_kn(weight_out, q_scale1, shape)).to(dtype)
    return [out, res]


def _samples(device, dtype, gen):
    from ..quantize import quantize_int8

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    x, r, g = rand(2, 3, 64), rand(2, 3, 64), rand(64)
    w1, w2 = rand(64, 96, scale=0.125), rand(48, 64, scale=0.15)  # [K, 2I], [I, K]
    w1_nk, w2_nk = rand(82, 64, scale=0.125), rand(64, 41, scale=0.15)  # I = 41
    q1 = quantize_int8(torch.randn(96, 64, generator=gen) * 0.125, 4, transposed_mode=True)  # [2I, K], G=4
    q2 = quantize_int8(torch.randn(64, 48, generator=gen) * 0.15, transposed_mode=True)  # [K, I], per row
    (q1, s1), (q2, s2) = ((q.to(device), q.scale.to(device)) for q in (q1, q2))
    gelu, silu = int(ActivationFuncType.GATED_GELU), int(ActivationFuncType.GATED_SILU)
    return [(x, r, w1, w2, g, 1e-5),
            (x[:, :1], r[:, :1], w1_nk, w2_nk, g, 1e-6, None, None, False, gelu, True),
            (x, r, q1, q2, g, 1e-5, s1, s2, True, silu, False)]


SPEC = OpSpec(
    name="rms_mlp_gemm",
    schema=("(Tensor input, Tensor residual, Tensor weight_interm, Tensor weight_out, Tensor gamma, float epsilon, "
            "Tensor? q_scale=None, Tensor? q_scale1=None, bool q_int8=False, int activation_type=4, "
            "bool transposed_mode=False) -> Tensor[]"),
    reference=rms_mlp_gemm,
    check=check_rms_mlp_gemm,
    output_shapes=lambda shape: [shape.shape, shape.shape],
    samples=_samples,
    op_class="MLPGemmOp",
)


def _check_config(owner: str, cfg) -> int:
    """The activation_type the config selects, or NotImplementedError naming the config field."""
    if cfg.norm_type != NormType.RMSNorm:
        raise NotImplementedError(f"{owner}: config field 'norm_type': {cfg.norm_type.name} (DeepSpeed's mlp_gemm) "
                                  f"is not implemented; norm_type=RMSNorm (rms_mlp_gemm) is")
    if cfg.mlp_act_func_type not in GATED_ACTIVATIONS:
        raise NotImplementedError(f"{owner}: config field 'mlp_act_func_type': {cfg.mlp_act_func_type.name} is not "
                                  f"implemented with norm_type=RMSNorm; use GATED_SILU or GATED_GELU")
    return int(cfg.mlp_act_func_type)


class MLPGemmOp(InferenceOp):
    """DeepSpeed's MLPGemmOp with `norm_type=RMSNorm`: `forward(input, residual, weight_interm, weight_out,
    input_bias=None, bias=None, gamma=None, beta=None)` -> `[output, residual_out]`.

    Reads from the config: `norm_type` (RMSNorm; LayerNorm raises NotImplementedError), `mlp_act_func_type`
    (GATED_SILU or GATED_GELU), `layer_norm_eps` (alias `epsilon`), `transposed_mode`, and `dtype`
    (torch.int8: both weights int8 `[N, K]` carrying `.scale`, activations `act_dtype`). `input_bias` is
    added to `input` first (DeepSpeed adds it in place; we do not modify `input`). `bias` and `beta` have
    no meaning with RMSNorm (DeepSpeed ignores them): passing one is an error, never silently dropped.
    """
    OP = "rms_mlp_gemm"

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        _check_config(type(self).__name__, self.config)  # early, as DeepSpeed picks its function here

    def forward(self, input: torch.Tensor, residual: torch.Tensor, weight_interm: torch.Tensor,
                weight_out: torch.Tensor, input_bias: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None) -> list[torch.Tensor]:
        """-> `[output, residual_out]`: `residual_out = input + residual`, `h = rms_norm(residual_out)`,
        `up, gate = (h @ W_interm).chunk(2, -1)`, `output = (act(gate) * up) @ W_out`.

        Layouts: `transposed_mode=False`: `weight_interm` `[K, 2I]`, `weight_out` `[I, K]`; True (nn.Linear):
        `[2I, K]` and `[K, I]`. At decode (small M) the gate|up GEMV writes `act(gate) * up` from its epilogue.

        >>> import torch, dsinf
        >>> from dsinf.config import ActivationFuncType, NormType
        >>> cfg = dsinf.InferenceConfig(dtype=torch.float32, transposed_mode=True, norm_type=NormType.RMSNorm,
        ...                             mlp_act_func_type=ActivationFuncType.GATED_SILU)
        >>> x, residual, gamma = torch.randn(1, 2, 64), torch.randn(1, 2, 64), torch.rand(64)
        >>> w_interm, w_out = torch.randn(2 * 96, 64) / 8, torch.randn(64, 96) / 8     # [2I, K], [K, I]
        >>> out, residual_out = dsinf.MLPGemmOp(cfg)(x, residual, w_interm, w_out, gamma=gamma)
        >>> out.shape, torch.equal(residual_out, x + residual)
        (torch.Size([1, 2, 64]), True)
        """
        owner = type(self).__name__
        for name, value in (("bias", bias), ("beta", beta)):
            if value is not None:
                _fail(owner, name, "has no meaning with norm_type=RMSNorm (DeepSpeed's rms_mlp_gemm ignores it): "
                                   "pass None")
        if input_bias is not None:
            input = _add_input_bias(owner, input, input_bias)
        return self._call(input)(input, residual, weight_interm, weight_out, gamma)

    def _bind(self, impl, checked):
        owner, cfg = type(self).__name__, self.config
        activation = _check_config(owner, cfg)
        quantized, transposed, act, eps = cfg.quantized, cfg.transposed_mode, cfg.activation_dtype, cfg.epsilon
        int8, grad_enabled = torch.int8, torch.is_grad_enabled
        short = (eps,) + (() if activation == ActivationFuncType.GATED_SILU and not transposed else
                          (None, None, False, activation, transposed))  # trailing schema defaults left out

        def slow(input, residual, weight_interm, weight_out, gamma):
            q_scale = self._q_scale(weight_interm, "weight_interm")
            q_scale1 = self._q_scale(weight_out, "weight_out")
            args = (input, residual, weight_interm, weight_out, gamma, eps, q_scale, q_scale1, quantized, activation,
                    transposed)
            check_rms_mlp_gemm(owner, *args, act_dtype=act)
            if grad_enabled():
                no_backward(owner, input=input, residual=residual, weight_interm=weight_interm,
                            weight_out=weight_out, gamma=gamma)
            return impl(*args)

        if checked:
            return slow

        def fast(input, residual, weight_interm, weight_out, gamma):  # validated in C++, grad mode included
            try:
                usual = (weight_interm.dtype is int8) is quantized and (weight_out.dtype is int8) is quantized
                scales = (weight_interm.scale, weight_out.scale) if quantized else None
            except AttributeError:  # not a tensor, or an int8 weight without .scale: named by the checks
                usual = False
            if not usual:
                return slow(input, residual, weight_interm, weight_out, gamma)
            try:
                if scales is None:
                    return impl(input, residual, weight_interm, weight_out, gamma, *short)
                return impl(input, residual, weight_interm, weight_out, gamma, eps, *scales, True, activation,
                            transposed)
            except CALL_ERRORS:  # rejected (gamma=None, a bad shape, a tensor that requires grad): name it
                return slow(input, residual, weight_interm, weight_out, gamma)

        return fast


def _add_input_bias(owner: str, input, input_bias):
    check_tensor(owner, "input", input)
    check_tensor(owner, "input_bias", input_bias, input)
    if input_bias.dtype != input.dtype or input_bias.dim() != 1 or input_bias.shape[0] != input.shape[-1]:
        _fail(owner, "input_bias", f"expected a {dtype_name(input.dtype)} tensor of shape ({input.shape[-1]},) "
                                   f"(same dtype as input), got {dtype_name(input_bias.dtype)} "
                                   f"{tuple(input_bias.shape)}")
    if torch.is_grad_enabled():  # named here: added to the input, it would make the op blame 'input'
        no_backward(owner, input_bias=input_bias)
    return input + input_bias
