"""`InferenceOp`: what LinearOp and VectorMatMulOp share - the config, input checks and the backend.

DeepSpeed's `BaseOp` loads one process-wide module in `__init__` and binds `module.<op>_<dtype>` by
attribute lookup, silently falling back on AttributeError. Here each op instance resolves its backend
through `dsinf.dispatch` once per (device type, dtype): at construction when `device=` is given,
otherwise on the first call. The decision is cached on the instance and never re-probed per call;
environment knobs are read when it is made. `op.decision` / `op.backend` show it.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .. import dispatch
from ..checks import InputError
from ..config import InferenceConfig


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class InferenceOp(torch.nn.Module):
    #: Module function family this op calls, e.g. "linear_layer".
    OP: ClassVar[str] = ""

    def __init__(self, config: InferenceConfig | dict | None = None, *, device: str | torch.device | None = None,
                 environment: dispatch.Environment | None = None):
        super().__init__()
        if config is None:
            config = InferenceConfig()
        elif isinstance(config, dict):
            config = InferenceConfig.from_dict(config)
        elif not isinstance(config, InferenceConfig):
            raise TypeError(f"{type(self).__name__}: config must be an InferenceConfig (or a dict), got "
                            f"{type(config).__name__}; for another library's config object use "
                            f"InferenceConfig.from_dict(vars(config), strict=False)")
        self.config = config
        self._environment = environment
        self._decisions: dict[tuple, dispatch.Decision] = {}
        self._last_decision: dispatch.Decision | None = None
        if device is not None:
            self.resolve(device)

    # --- backend ----------------------------------------------------------------------------------
    def resolve(self, device: str | torch.device) -> dispatch.Decision:
        """The backend decision for inputs on `device` with the config's dtype (made once, then cached)."""
        device_type = torch.device(device).type
        cfg = self.config
        key = (device_type, cfg.dtype, cfg.activation_dtype)
        decision = self._decisions.get(key)
        if decision is None:
            owner = type(self).__name__
            request = dispatch.Request(op=self.OP, device_type=device_type, act_dtype=cfg.activation_dtype,
                                       int8=cfg.quantized, use_triton=cfg.use_triton)
            decision = dispatch.resolve(request, self._environment, owner=owner)
            dispatch.log_fallbacks(decision, owner)
            if decision.backend == "triton":
                self._warm_triton()
            self._decisions[key] = decision
            self._last_decision = decision
        return decision

    def _warm_triton(self) -> None:
        # DeepSpeed autotunes when layer 0 is built with triton_autotune; we do it when Triton is chosen,
        # for the config's weight dtype and layout (both are part of the table's key).
        cfg = self.config
        if cfg.triton_autotune and cfg.layer_id == 0 and cfg.hidden_size > 0:
            extra = {"act_dtype": cfg.activation_dtype} if cfg.quantized else {}
            out_features = self._autotune_out_features()
            if out_features:
                extra["out_features"] = out_features
            self._triton_autotune(2, cfg.max_out_tokens, cfg.hidden_size, cfg.dtype,
                                  transposed_mode=cfg.transposed_mode, **extra)

    def _autotune_out_features(self) -> int | None:
        """Output width to tune for when the config knows it better than the default."""
        return None

    @staticmethod
    def _triton_autotune(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype=torch.float16, **kwargs):
        raise NotImplementedError

    def _impl_for(self, input: torch.Tensor):
        """The chosen backend's function for `input` (a dict lookup once decided: the per-call path)."""
        cfg = self.config
        decision = self._decisions.get((input.device.type, cfg.dtype, cfg.activation_dtype))
        return (decision or self.resolve(input.device)).impl

    @property
    def decision(self) -> dispatch.Decision:
        """The decision made most recently; before any call, the one for CUDA if available, else CPU."""
        if self._last_decision is None:
            self.resolve("cuda" if torch.cuda.is_available() else "cpu")
        return self._last_decision

    @property
    def backend(self) -> str:
        """Name of the chosen backend: 'compiled', 'triton' or 'torch'."""
        return self.decision.backend

    # --- inputs -----------------------------------------------------------------------------------
    def _q_scale(self, weight) -> torch.Tensor | None:
        """`weight.scale` for int8 configs (None otherwise), after checking weight and config agree."""
        if not isinstance(weight, torch.Tensor):
            return None  # the shared checks name 'weight'
        cfg = self.config
        if (weight.dtype == torch.int8) != cfg.quantized:
            if cfg.quantized:
                message = (f"config.dtype is int8 but the weight is {_dtype_name(weight.dtype)}: quantize it with "
                           f"dsinf.quantize_int8(weight, transposed_mode=...)")
            else:
                message = (f"is int8 but config.dtype is {_dtype_name(cfg.dtype)}: int8 weights need "
                           f"InferenceConfig(dtype=torch.int8)")
            raise InputError(type(self).__name__, "weight", message)
        if not cfg.quantized:
            return None
        scale = getattr(weight, "scale", None)
        if scale is None:
            raise InputError(type(self).__name__, "weight",
                             "is int8 but has no .scale (float32 [G] scales, alias q_scale): quantize with "
                             "dsinf.quantize_int8, and re-attach .scale after .to()/.cuda(), which drop it")
        return scale
