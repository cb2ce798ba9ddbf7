"""Model injection: run a PyTorch / Hugging Face model's linear layers (and Llama-family blocks) on dsinf.

    import dsinf
    model = dsinf.inject(model)                          # float: every nn.Linear, Llama fusions
    model = dsinf.inject(model, quantize="int8")         # int8 weight-only (the output head stays float)
    model = dsinf.init_inference(model, dtype=torch.float16, replace_with_kernel_inject=True)  # DeepSpeed-style
    dsinf.injection_summary(model)                       # what was replaced, fused, kept and why (data)

Modules: `linear` (the injected linear modules), `llama` (recognition and the fused attention / MLP),
`attention` (grouped-query decode attention without repeating the cache), `rope` (when dsinf's RoPE may
replace the model's), `graphs` (static-cache decode steps on CUDA graphs), `stopcheck` (generate's stop
check one step behind on CUDA), `summary`, `export` (weights back in the original layout), `keywords`
(`init_inference`'s DeepSpeed keywords). Nothing here imports `transformers`: recognition reads module
attributes and configs, and the HF helpers a fused forward calls come from the module that defined the
model's own class.
"""
from __future__ import annotations

import logging
import numbers
import sys
import time
import types

import torch
from torch import nn

from .. import routes
from . import graphs, stopcheck
from .export import export_state_dict
from .keywords import init_inference
from .linear import InjectedLinear, InjectedQKV, one_gemm_input
from .llama import (FusedMLP, fuse_attention, fuse_decoder_layer, fuse_mlp, match_attention, match_decoder_layer,
                    match_mlp, swap_class)
from .rope import RopeDecision, RopePositions, WatchedRotary, decide_rotary, rotary_module
from .summary import Fused, InjectionSummary, Skipped

__all__ = ["InjectedLinear", "InjectedQKV", "InjectionSummary", "export_state_dict", "init_inference", "inject",
           "injection_summary"]

logger = logging.getLogger("dsinf")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_arguments(model, dtype, quantize, groups, skip, cuda_graph, defer_stop) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject: argument 'model': expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_dsinf_injection", None) is not None:
        raise ValueError("inject: argument 'model': already injected (see dsinf.injection_summary(model))")
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:  # no weights to quantize or share yet: say so before anything is rewritten
        raise ValueError(f"inject: argument 'model': its parameters are not materialised ({meta} is on the meta "
                         f"device): load the weights first (from_pretrained, or to_empty() + load_state_dict)")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        hint = " (for int8 weights pass quantize='int8')" if dtype == torch.int8 else ""
        raise ValueError(f"inject: argument 'dtype': expected None, float32, float16 or bfloat16, got {dtype}{hint}")
    if quantize not in (None, "int8"):
        raise ValueError(f"inject: argument 'quantize': expected None or 'int8', got {quantize!r}")
    if groups is not None:
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
            raise ValueError(f"inject: argument 'groups': expected None (per channel) or an int >= 1, got {groups!r}")
        if quantize is None:
            raise ValueError("inject: argument 'groups': only meaningful with quantize='int8'")
    if not (isinstance(cuda_graph, bool) or cuda_graph == "eager"):
        raise TypeError(f"inject: argument 'cuda_graph': expected True, False or 'eager', got {cuda_graph!r}")
    if not isinstance(defer_stop, bool):
        raise TypeError(f"inject: argument 'defer_stop': expected True or False, got {defer_stop!r}")
    if isinstance(skip, str) or not isinstance(skip, (tuple, list, set, frozenset)) or \
            not all(isinstance(s, str) for s in skip):
        raise TypeError(f"inject: argument 'skip': expected a tuple of module names, got {skip!r}")
    names = [name for name, _ in model.named_modules() if name] if skip else []
    for s in skip:  # a misspelt name would silently skip nothing
        if s == "":
            raise ValueError("inject: argument 'skip': '' is the whole model: to leave it all to torch, do not "
                             "inject it")
        if not any(_skipped(name, (s,)) for name in names):
            example = max(names, key=lambda n: n.count("."), default="")
            raise ValueError(f"inject: argument 'skip': {s!r} names no module of the model (an entry is a full "
                             f"dotted name such as {example!r}, or its last components such as "
                             f"{'.'.join(example.split('.')[-2:])!r})")


def _one_gemm(module: nn.Module, args: tuple):
    """A forward pre-hook on the linears inject leaves to torch (`skip`): their weights are frozen too, so a
    sliced 3-D input (a head's `hidden[:, -1:, :]`) would run as a batched GEMM reading the weight once per
    row (`linear.one_gemm_input`; a Llama-3 head is 1 GiB in fp16)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        y = one_gemm_input(x)
        if y is not x:
            return (y, *args[1:])
    return None


def _heads(model: nn.Module) -> set[int]:
    """ids of the model's output head linears: HF's `get_output_embeddings()`, and any linear named lm_head."""
    found = {id(m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "lm_head" and type(m) is nn.Linear}
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # a PreTrainedModel without a head
        head = None
    if type(head) is nn.Linear:
        found.add(id(head))
    return found


def _cast_keeping_rotary_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype), but the rotary embeddings' float32 frequency buffers (inv_freq, original_inv_freq)
    stay float32, as `from_pretrained(dtype=...)` leaves them: cast, HF's own rotary would use rounded
    frequencies (bf16: 8 bits, radians off within a few hundred positions) and dsinf's fused RoPE, which
    must equal the model's, would be refused."""
    kept = [(m, name, buf) for m in model.modules() for name, buf in m.named_buffers(recurse=False)
            if name in ("inv_freq", "original_inv_freq") and buf.dtype == torch.float32]
    model.to(dtype)
    for module, name, buf in kept:
        setattr(module, name, buf)


def _save_pretrained_refused(*args, **kwargs):
    """HF's save_pretrained on an injected model would write dsinf's layout (fused q|k|v and gate|up, int8
    weights) under the original architecture's name; from_pretrained would then initialise those layers at
    random, with only a load report to say so."""
    raise RuntimeError("save_pretrained on a dsinf-injected model would write a checkpoint from_pretrained "
                       "cannot load (fused q|k|v and gate|up, int8 weights): save "
                       "dsinf.inject.export_state_dict(model) into the original model class instead, or save "
                       "the model before inject")


def _takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:
        return False
    return True


_AUTOCAST_TAKES_DEVICE = _takes_device()  # torch >= 2.4; asked once, not per forward


def _autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is on for `device_type` (older torch has one function per device)."""
    if _AUTOCAST_TAKES_DEVICE:
        return torch.is_autocast_enabled(device_type)
    return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _autocast_dtype(device_type: str) -> torch.dtype:
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _autocast_refused(model: nn.Module, args, kwargs):
    """A forward pre-hook on the injected model: dsinf's ops compute in the weights' dtype and do not follow
    torch.autocast. Under an autocast to another dtype, the layers left to torch would return that dtype to
    dsinf's ops (which refuse it, naming only an op), or mix it with ours inside HF's code (which fails in
    torch's autocast internals): say what happened and what to do, before the first layer runs. An autocast
    to the model's own dtype changes nothing dsinf computes and is let through."""
    if not (_autocast_on("cuda") or _autocast_on("cpu")):
        return None  # the common case, without walking the parameters
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None or weight.device.type not in ("cuda", "cpu") or not _autocast_on(weight.device.type):
        return None
    dtype = _autocast_dtype(weight.device.type)
    if dtype != weight.dtype:
        name = str(weight.dtype).replace("torch.", "")
        wanted = str(dtype).replace("torch.", "")
        raise RuntimeError(f"dsinf.inject: this injected model computes in {name} (its weights' dtype) and does not "
                           f"follow torch.autocast({weight.device.type!r}, dtype=torch.{wanted}): call it outside "
                           f"autocast, or inject the model in {wanted} instead "
                           f"(dsinf.inject(model, dtype=torch.{wanted}) on a model not yet injected)")
    return None


def _report_other_matrices(model: nn.Module, summary: InjectionSummary, quantize: str | None) -> None:
    """Weight parameters of 2+ dims outside the linears (an MoE block's stacked 3-D expert weights, a
    convolution) stay the model's, on torch and in float: said, so a summary of "int8 on N linears" hides no
    float matrices. Not reported: embeddings (lookups), parameters with a leading dimension of 1 (added and
    broadcast, such as a ViT's cls_token and position embeddings), Conv1D (reported with the linears), and
    buffers (a quantized format's packed weights are its own module's business)."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding, InjectedLinear)) or type(m).__name__ == "Conv1D":
            continue
        own = [p for p in m.parameters(recurse=False) if p.dim() >= 2 and p.shape[0] > 1]
        if own:
            values = sum(p.numel() for p in own)
            summary.skipped.append(Skipped(name, f"{type(m).__name__} holds {values:,} weight values in {len(own)} "
                                                 f"tensors of 2+ dims that inject does not rewrite: on torch"
                                                 + (", float (not quantized)" if quantize else "")))


def _skipped(name: str, skip) -> bool:
    """Whether module `name` or a module containing it is listed in `skip` (a full name, or last components:
    "lm_head", "self_attn", "layers.0")."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == s or p.endswith("." + s) for p in prefixes for s in skip)


def inject(model: nn.Module, *, dtype: torch.dtype | None = None, quantize: str | None = None,
           groups: int | None = None, fuse: bool = True, skip=(), use_triton: bool = False,
           cuda_graph: bool | str = True, defer_stop: bool = True) -> nn.Module:
    """Rewrite `model` in place to run on dsinf's ops; returns it.

    Args:
        model: any `nn.Module`; Llama-family decoders (Llama, Mistral, Qwen2) get fused blocks.
        dtype: convert the model to this float dtype first (None: keep it).
        quantize: None (float weights, shared with the original layers, no copy) or "int8" (weight-only).
            The output head (`model.get_output_embeddings()`, or a linear named `lm_head`) runs on dsinf
            in its float dtype (routed like any linear): its logits are what int8 rounding hurts most, as in
            other int8 weight-only schemes.
        groups: int8 scale groups per weight matrix (None: one scale per output channel); must divide
            every quantized layer's output rows.
        fuse: fuse q|k|v (+RoPE where it is the model's) and gate|up in recognised blocks.
        skip: module names (full, or the last components: "lm_head", "self_attn", "layers.0") left as they
            are, on torch, with everything inside them; a block with a listed projection is not fused, nor a
            decoder layer with a listed norm, and a listed rotary module keeps HF's RoPE. A name that matches
            no module raises.
        use_triton: let the ops pick Triton on CUDA when no compiled kernel serves them.
        cuda_graph: a generative model's static-cache decode steps on CUDA run from CUDA graphs dsinf
            captures (`dsinf.inject.graphs`), in place of HF's torch.compile of the decode step, whose
            per-step host cost hid the kernels' speed. True: the captured step is the forward compiled by
            inductor (the model's small ops fused, dsinf's ops called as they are; compiled at the first
            decode step, the eager step if inductor fails there). "eager": the eager forward is captured
            (no compile; each small op stays a kernel). False keeps HF's compile.
        defer_stop: a generative model's `generate` on CUDA reads its stop flag one step late, so the host
            queues the next step while the GPU runs this one (`dsinf.inject.stopcheck`: HF's own
            DeferredStopCheck, which HF enables on mps only). A stop on an end-of-sequence token then
            costs one extra step, undone before generate returns. False keeps HF's sync after every token.

    Every parameter of the model stops requiring grad (the ops are inference-only: a forward in grad
    mode then runs, gradless); the linears left to torch get a pre-hook that keeps torch's matmul on one
    GEMM for a sliced 3-D input (`_one_gemm`). Logs one summary (logger "dsinf", INFO);
    `injection_summary(model)` returns it as data.
    """
    _check_arguments(model, dtype, quantize, groups, skip, cuda_graph, defer_stop)
    if dtype is not None:
        _cast_keeping_rotary_fp32(model, dtype)
    heads = _heads(model)
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and not _skipped(name, skip)]
    if groups is not None:  # check before anything changes; q|k|v and gate|up rows are then divisible too
        for name, m in linears:
            if id(m) in heads:
                continue  # not quantized
            if m.out_features % groups:
                raise ValueError(f"inject: argument 'groups': {groups} groups do not divide the {m.out_features} "
                                 f"output rows of {name}")
    float_dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    summary = InjectionSummary(dtype=str(float_dtypes[0] if float_dtypes else None).replace("torch.", ""),
                               quantize=quantize, groups=groups)
    options = dict(quantize=quantize, groups=groups, use_triton=use_triton)
    if fuse:
        _fuse_blocks(model, summary, skip, options)
    else:
        summary.rope = "fuse=False: no block fused"
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear:
                if isinstance(child, nn.Linear) and not isinstance(child, InjectedLinear):
                    summary.skipped.append(Skipped(name, f"{type(child).__name__} subclasses nn.Linear; its "
                                                         f"forward may differ"))
                elif type(child).__name__ == "Conv1D":  # transformers' GPT-2-style projection: say it stays
                    summary.skipped.append(Skipped(name, "transformers' Conv1D (weight [in, out], GPT-2 style) is "
                                                         "not an nn.Linear: left to torch, not quantized"))
                continue
            if _skipped(name, skip):
                summary.skipped.append(Skipped(name, "listed in skip"))
                continue
            head = id(child) in heads  # the output head: float whatever `quantize` says
            setattr(parent, child_name, InjectedLinear.from_linear(
                child, **({**options, "quantize": None, "groups": None} if head else options)))
            summary.replaced.append(name)
            if head and quantize:
                summary.float_heads.append(name)
    _report_other_matrices(model, summary, quantize)
    for m in model.modules():
        if isinstance(m, InjectedLinear):
            summary.backends[m.backend] = summary.backends.get(m.backend, 0) + 1
    for p in model.parameters():  # inference: the ops have no backward, and refuse grad-requiring tensors in
        p.requires_grad_(False)   # grad mode - frozen weights keep activations gradless, so grad mode is fine
    for m in model.modules():  # the linears left to torch (skip): see _one_gemm
        if isinstance(m, nn.Linear) and not isinstance(m, InjectedLinear):
            m.register_forward_pre_hook(_one_gemm)
    if cuda_graph and graphs.install(model, swap_class, compiled=cuda_graph is True) is not None:
        summary.cuda_graph = graphs.describe(cuda_graph is True)
    model.register_forward_pre_hook(_autocast_refused, with_kwargs=True)
    if defer_stop and stopcheck.install(model, swap_class):
        summary.stop_check = stopcheck.describe()
    model._dsinf_injection = summary
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = _save_pretrained_refused  # an instance attribute: push_to_hub calls it too
    start, before = time.perf_counter(), routes.measured_count()
    tuned = routes.tune_model(model)  # measured routes of the model's linear and fused-MLP shapes (CUDA; DSINF_ROUTES)
    if tuned:
        fresh, keys = routes.measured_count() - before, len({r.key for r in tuned})  # a gate|up's matmul: twice
        summary.routes = (f"{keys} routes of its shapes: {fresh} measured now ({time.perf_counter() - start:.1f} s), "
                          f"{keys - fresh} reused (persisted per device and build: python -m dsinf.routes)")
    for m in model.modules():  # a shape the routes now send to ATen for every M calls torch directly
        if isinstance(m, InjectedLinear) and m.decision is not None:
            m.follow_routes()
            if m.route == "aten":
                summary.aten_routed += 1
    logger.info("%s", summary.format())
    return model


def _fuse_blocks(model: nn.Module, summary: InjectionSummary, skip, options) -> None:
    modules = [(n, m) for n, m in model.named_modules() if not _skipped(n, skip)]
    attentions, mlps = [], []
    # (a module that looks like one, its matcher, where matches go, its name in a skip reason)
    kinds = (("q_proj", match_attention, attentions, "attention"), ("gate_proj", match_mlp, mlps, "MLP"))
    # What a fused block runs on dsinf's ops: one of them listed in skip keeps the block the model's.
    fused_parts = {"attention": ("q_proj", "k_proj", "v_proj"), "MLP": ("gate_proj", "up_proj", "act_fn")}
    for name, m in modules:
        for marker, match_block, matched, label in kinds:
            if hasattr(m, marker):
                listed = [p for p in fused_parts[label] if _skipped(f"{name}.{p}", skip)]
                if listed:  # a fused block would replace it: the block stays the model's
                    summary.skipped.append(Skipped(name, f"{label} not fused: {', '.join(listed)} listed in skip"))
                    break
                match = match_block(m)
                if match.ok:
                    matched.append((name, m))
                else:
                    summary.skipped.append(Skipped(name, f"{label} not fused: {match.reason}"))
                break
    config, head_dim, rotary = None, 0, None
    if attentions:
        name, first = attentions[0]
        config, head_dim, rotary = first.config, first.head_dim, rotary_module(model, name)
        rotary_name = next((n for n, m in model.named_modules() if m is rotary), "")
        if rotary is not None and _skipped(rotary_name, skip):
            decision = RopeDecision(False, f"{rotary_name} listed in skip: HF's rotary kept")
        else:
            decision = decide_rotary(rotary, config, head_dim)
    else:
        decision = RopeDecision(False, "no Llama-family attention recognised")
    summary.rope_fused, summary.rope = decision.fused, decision.reason
    # One per model: every layer of a step reads the same position_ids.
    positions = RopePositions(decision, config, head_dim, summary)
    if decision.fused:  # a later cast or move of the model decides again (rope.WatchedRotary)
        swap_class(rotary, WatchedRotary)
        rotary.__dict__["_dsinf_positions"] = positions
    for name, m in attentions:
        detail = fuse_attention(m, positions, decision.theta, **options)
        summary.fused.append(Fused(name, "attention", detail))
        summary.replaced.extend(f"{name}.{p}" for p, _ in m.qkv_proj.parts)
    for name, m in mlps:
        detail = fuse_mlp(m, **options)
        summary.fused.append(Fused(name, "mlp", detail))
        summary.replaced.extend(f"{name}.{p}" for p, _ in m.gate_up_proj.parts)
    if not mlps:
        return
    for name, m in modules:  # decoder layers around a fused MLP: norms + residual + MLP as two ops
        if not hasattr(m, "post_attention_layernorm"):
            continue
        down = getattr(getattr(m, "mlp", None), "down_proj", None)
        if type(down) is nn.Linear and isinstance(m.mlp, FusedMLP) and not _skipped(f"{name}.mlp.down_proj", skip):
            m.mlp.down_proj = InjectedLinear.from_linear(down, **options)  # the op reads its weight
            summary.replaced.append(f"{name}.mlp.down_proj")
        listed = [p for p in ("input_layernorm", "post_attention_layernorm") if _skipped(f"{name}.{p}", skip)]
        if listed:  # the fused layer runs both norms on dsinf's ops
            summary.skipped.append(Skipped(name, f"decoder layer not fused: {', '.join(listed)} listed in skip"))
            continue
        match = match_decoder_layer(m)
        if not match.ok:
            summary.skipped.append(Skipped(name, f"decoder layer not fused: {match.reason}"))
            continue
        detail = fuse_decoder_layer(m)
        if detail:
            summary.fused.append(Fused(name, "layer", detail))
        else:
            summary.skipped.append(Skipped(name, "decoder layer not fused here: no compiled rms_mlp_gemm / rms_norm "
                                                 "for this device and dtype (it is bound again after .to())"))


def injection_summary(model: nn.Module) -> InjectionSummary:
    """What `inject` did to `model` (raises ValueError when it was not injected)."""
    summary = getattr(model, "_dsinf_injection", None)
    if summary is None:
        raise ValueError("injection_summary: argument 'model': not injected (call dsinf.inject(model) first)")
    return summary


class _CallablePackage(types.ModuleType):
    """`dsinf.inject` names both this package and the function: once `dsinf.inject.<sub>` has been imported,
    the attribute `dsinf.inject` is the package, so the package calls the function."""

    def __call__(self, model: nn.Module, **kwargs) -> nn.Module:
        return inject(model, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
