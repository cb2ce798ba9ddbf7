"""`init_inference`: DeepSpeed's `deepspeed.init_inference(model, config=None, **kwargs)` keywords -> `inject`.

Every keyword is either translated or refused with a reason - none is silently ignored:

    dtype                         float dtype -> inject(dtype=...); torch.int8 -> quantize="int8" (activations
                                  keep the model's float dtype)
    replace_with_kernel_inject    True (default): fuse Llama-family blocks; False: replace linears only
      (alias kernel_inject)
    tensor_parallel / tp          {"tp_size": 1} (or an object with tp_size); a size > 1 is refused
    mp_size                       1 only (DeepSpeed's deprecated spelling of tp_size)
    quant                         {"enabled": bool, "weight": {"num_bits": 8, "q_groups": G}}: enabled -> int8
                                  weight-only; q_groups -> groups (DeepSpeed's q_groups=1 means ONE scale per
                                  matrix; ours defaults to per channel when q_groups is absent)
    use_triton                    -> inject(use_triton=...)
    enable_cuda_graph             -> inject(cuda_graph=...): static-cache decode steps on dsinf's CUDA graphs
                                  (default False, as DeepSpeed's; a bool)
    skip, groups                  ours, passed to inject
"""
from __future__ import annotations

import difflib

import torch

from ..config import parse_dtype

_TRANSLATED = ("dtype", "replace_with_kernel_inject", "kernel_inject", "tensor_parallel", "tp", "mp_size", "quant",
               "use_triton", "enable_cuda_graph", "skip", "groups")
# DeepSpeed keywords with no dsinf meaning yet: refused with this reason rather than dropped.
_UNSUPPORTED = {
    "injection_policy": "custom injection policies are not supported; dsinf recognises blocks by structure",
    "injection_dict": "custom injection policies are not supported; dsinf recognises blocks by structure",
    "injection_policy_tuple": "custom injection policies are not supported",
    "checkpoint": "checkpoint loading is not supported: load the weights into the model first",
    "base_dir": "checkpoint loading is not supported",
    "save_mp_checkpoint_path": "saving sharded checkpoints is not supported",
    "moe": "mixture-of-experts injection is not supported",
    "ep_size": "expert parallelism is not supported",
    "zero": "ZeRO-Inference is not supported",
    "max_out_tokens": "dsinf allocates no KV workspace (HF's cache is kept); drop the keyword",
    "min_out_tokens": "dsinf allocates no KV workspace (HF's cache is kept); drop the keyword",
    "replace_method": "DeepSpeed's replace_method is deprecated and has no dsinf meaning",
    "triton_autotune": "injected layers use compiled kernels; autotune Triton with the op classes instead",
    "return_tuple": "the model's own outputs are kept",
    "training_mp_size": "tensor parallelism is not supported",
    "set_empty_params": "meta-device models are not supported",
    "keep_module_on_host": "offloading is not supported",
    "transposed_mode": "injected layers always use nn.Linear's layout",
    "triangular_masking": "HF's masks are kept",
}


def _tp_size(name: str, value) -> int:
    if isinstance(value, dict):
        size = value.get("tp_size", 1)
    elif hasattr(value, "tp_size"):
        size = value.tp_size
    else:
        size = value
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"init_inference: argument '{name}': expected a tp_size int (or {{'tp_size': n}}), "
                        f"got {value!r}")
    return size


def _quant(value) -> tuple[bool, int | None]:
    if not isinstance(value, dict):
        raise TypeError(f"init_inference: argument 'quant': expected a dict, got {type(value).__name__}")
    weight = value.get("weight", {}) or {}
    if not isinstance(weight, dict):
        raise TypeError(f"init_inference: argument 'quant': 'weight' must be a dict (num_bits, q_groups), got "
                        f"{type(weight).__name__}")
    bits = weight.get("num_bits", 8)
    if bits != 8:
        raise ValueError(f"init_inference: argument 'quant': weight num_bits={bits} is not supported (8 only)")
    return bool(value.get("enabled", False)), weight.get("q_groups")


def init_inference(model, config: dict | None = None, **kwargs):
    """DeepSpeed-style entry point: `dsinf.init_inference(model, dtype=torch.float16,
    replace_with_kernel_inject=True)`. Keywords (or a `config` dict with the same keys): see the module
    doc. An unknown or unsupported keyword, or a tensor-parallel size > 1, raises. Returns the model."""
    from . import inject  # the package's entry point (keywords is imported by it)

    if config is not None:
        if not isinstance(config, dict):
            raise TypeError(f"init_inference: argument 'config': expected a dict, got {type(config).__name__}")
        clash = sorted(set(config) & set(kwargs))
        if clash:
            raise ValueError(f"init_inference: {clash} given both in config and as keywords")
        kwargs = {**config, **kwargs}
    for key in kwargs:
        if key in _UNSUPPORTED:
            raise ValueError(f"init_inference: keyword '{key}' is not supported: {_UNSUPPORTED[key]}")
        if key not in _TRANSLATED:
            close = difflib.get_close_matches(key, _TRANSLATED + tuple(_UNSUPPORTED), n=1)
            raise TypeError(f"init_inference: unknown keyword '{key}'" + (f" (did you mean '{close[0]}'?)" if close
                                                                          else ""))
    for key in ("tensor_parallel", "tp", "mp_size"):
        if key in kwargs and _tp_size(key, kwargs[key]) != 1:
            raise ValueError(f"init_inference: argument '{key}': tensor-parallel size {_tp_size(key, kwargs[key])} "
                             f"is not supported (dsinf runs one device per model; use 1)")
    cuda_graph = kwargs.get("enable_cuda_graph", False)
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"init_inference: argument 'enable_cuda_graph': expected a bool, got {cuda_graph!r}")
    quantize, groups, q_groups = None, kwargs.get("groups"), None
    if "quant" in kwargs:
        enabled, q_groups = _quant(kwargs["quant"])
        quantize = "int8" if enabled else None
        groups = q_groups if q_groups is not None else groups
    dtype = kwargs.get("dtype")
    if dtype is not None:
        parsed = parse_dtype(dtype)
        if parsed is None:
            raise ValueError(f"init_inference: argument 'dtype': not a dtype: {dtype!r}")
        dtype = parsed
        if dtype == torch.int8:
            quantize, dtype = "int8", None
    if quantize is None and q_groups is not None and groups == q_groups:
        groups = None  # quant's q_groups while quantization is off: ignored, as DeepSpeed does
    fuse = kwargs.get("replace_with_kernel_inject", kwargs.get("kernel_inject", True))
    return inject(model, dtype=dtype, quantize=quantize, groups=groups, fuse=bool(fuse),
                  skip=kwargs.get("skip", ()), use_triton=bool(kwargs.get("use_triton", False)),
                  cuda_graph=cuda_graph)
