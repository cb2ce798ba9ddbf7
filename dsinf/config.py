"""`InferenceConfig` (alias `DeepSpeedInferenceConfig`): the op configuration, validated.

Field names, order and defaults are DeepSpeed's (`deepspeed/ops/transformer/inference/config.py`), so
`InferenceConfig(hidden_size, intermediate_size, heads, ...)` and DeepSpeed-style keyword calls keep
working. Unlike DeepSpeed's plain class:

- every value is checked when the config is built *and* when a field is assigned later; a bad value
  raises `ConfigError` (a `ValueError`) naming the field. To change several related fields at once
  (say `heads` and `num_kv`), use `dataclasses.replace(cfg, heads=..., num_kv=...)`.
- `from_dict` / `from_json_file` validate too, and an unknown key is an error (with a "did you
  mean" hint): a typo such as `rope_thetha` silently keeping the default is the bug we refuse to
  keep. `strict=False` turns unknown keys into a warning and ignores them (for dicts saved by other
  tools). dtypes may be given as strings ("fp16", "bfloat16", "torch.int8", ...).
- `dtype=torch.int8` means int8 weights; activations are `act_dtype` (ours: default float16,
  bfloat16 or float32 allowed), read resolved as `config.activation_dtype`.

Fields the ops of this package read: `dtype`, `act_dtype`, `transposed_mode`, `rotary_dim`,
`rotate_half`, `rotate_every_two`, `rope_theta`, `num_kv`, `use_triton`, `triton_autotune`,
`layer_id`, `hidden_size`, `max_out_tokens`, and for `MLPGemmOp` `norm_type`, `mlp_act_func_type`,
`layer_norm_eps`. The rest are accepted, validated for type and kept for
DeepSpeed-style callers.

RoPE pairing: `rotate_half=True` selects NeoX/Llama pairs `(i, i + rotary_dim/2)` and wins over
`rotate_every_two`; otherwise `rotate_every_two=True` selects GPT-J pairs `(2i, 2i+1)`. With
`rotary_dim > 0` and both False, DeepSpeed would silently skip the rotation; we raise.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["ActivationFuncType", "ConfigError", "DeepSpeedInferenceConfig", "InferenceConfig", "NormType",
           "parse_dtype"]


class ConfigError(ValueError):
    """A bad `InferenceConfig` value. `field` names the field (or the unknown key)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"InferenceConfig: field '{field}': {message}")
        self.field = field


class NormType(enum.IntEnum):
    """DeepSpeed's `deepspeed.utils.types.NormType` (same values, so its members convert)."""
    UNKNOWN = 0
    LayerNorm = 1
    GroupNorm = 2
    RMSNorm = 3


class ActivationFuncType(enum.IntEnum):
    """DeepSpeed's `deepspeed.utils.types.ActivationFuncType` (same values)."""
    UNKNOWN = 0
    GELU = 1
    ReLU = 2
    GATED_GELU = 3
    GATED_SILU = 4


_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def parse_dtype(value: Any) -> torch.dtype | None:
    """A torch.dtype from a dtype or a name ("fp16", "torch.bfloat16", ...); None if not recognised."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        return _DTYPE_NAMES.get(name[len("torch."):] if name.startswith("torch.") else name)
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- per-field checks: (value) -> normalized value, or raise ValueError(message) ----------------------

def _integer(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"expected an int, got {value!r}")
    return int(value)


def _unset_or_positive(value) -> int:
    value = _integer(value)
    if value != -1 and value < 1:
        raise ValueError(f"must be -1 (unset) or >= 1, got {value}")
    return value


def _at_least(low: int) -> Callable[[Any], int]:
    def check(value) -> int:
        value = _integer(value)
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        return value
    return check


def _positive_float(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number > 0, got {value!r}")
    return float(value)


def _boolean(value) -> bool:
    # Strings are refused on purpose: bool("false") is True.
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"expected a bool, got {value!r}")


def _weight_dtype(value) -> torch.dtype:
    dtype = parse_dtype(value)
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"must be one of float32, float16, bfloat16, int8, got {value!r}")
    return dtype


def _act_dtype(value) -> torch.dtype | None:
    if value is None:
        return None
    dtype = parse_dtype(value)
    if dtype not in ACT_DTYPES:
        raise ValueError(f"must be None, float16, bfloat16 or float32, got {value!r}")
    return dtype


def _enum(kind: type[enum.IntEnum]) -> Callable[[Any], enum.IntEnum]:
    def check(value):
        try:
            if isinstance(value, str):
                return kind[value.split(".")[-1]]
            return kind(int(value))  # our members, DeepSpeed's IntEnum members, plain ints
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"expected one of {', '.join(m.name for m in kind)}, got {value!r}") from None
    return check


def _rotary_dim(value) -> int:
    value = _integer(value)
    if value > 0 and value % 2:
        raise ValueError(f"must be even (RoPE rotates pairs), got {value}")
    return value


def _num_kv(value) -> int:
    value = _integer(value)
    if value != -1 and value < 1:
        raise ValueError(f"must be -1 (= heads) or >= 1, got {value}")
    return value


def _field(default, check: Callable[[Any], Any]):
    return field(default=default, metadata={"check": check})


@dataclass(eq=True)
class InferenceConfig:
    """Configuration of the dsinf inference ops; DeepSpeed's `DeepSpeedInferenceConfig`, validated.

    Example:
        ```python
        import torch, dsinf
        cfg = dsinf.InferenceConfig(dtype=torch.bfloat16, transposed_mode=True, rotary_dim=64,
                                    rotate_half=True, rope_theta=500000.0, num_kv=8, heads=32,
                                    hidden_size=4096)
        assert cfg.activation_dtype is torch.bfloat16
        ```
    """
    hidden_size: int = _field(-1, _unset_or_positive)
    intermediate_size: int = _field(-1, _integer)  # <= 0: 4 * hidden_size (when hidden_size is set)
    heads: int = _field(-1, _unset_or_positive)
    num_hidden_layers: int = _field(-1, _unset_or_positive)
    layer_norm_eps: float = _field(1e-12, _positive_float)
    local_rank: int = _field(-1, _at_least(-1))
    mp_size: int = _field(1, _at_least(1))
    dtype: torch.dtype = _field(torch.float16, _weight_dtype)
    pre_layer_norm: bool = _field(True, _boolean)
    norm_type: NormType = _field(NormType.LayerNorm, _enum(NormType))
    stochastic_mode: bool = _field(False, _boolean)
    scale_attention: bool = _field(True, _boolean)
    triangular_masking: bool = _field(True, _boolean)
    local_attention: bool = _field(False, _boolean)
    window_size: int = _field(256, _at_least(1))
    rotary_dim: int = _field(-1, _rotary_dim)  # <= 0: no RoPE
    rotate_half: bool = _field(False, _boolean)
    rotate_every_two: bool = _field(True, _boolean)
    return_tuple: bool = _field(True, _boolean)
    mlp_after_attn: bool = _field(True, _boolean)
    mlp_act_func_type: ActivationFuncType = _field(ActivationFuncType.GELU, _enum(ActivationFuncType))
    training_mp_size: int = _field(1, _at_least(1))
    bigscience_bloom: bool = _field(False, _boolean)
    max_out_tokens: int = _field(1024, _at_least(1))
    min_out_tokens: int = _field(1, _at_least(1))
    enable_qkv_quantization: bool = _field(False, _boolean)
    use_mup: bool = _field(False, _boolean)
    scale_attn_by_inverse_layer_idx: bool = _field(False, _boolean)
    return_single_tuple: bool = _field(False, _boolean)
    set_empty_params: bool = _field(False, _boolean)
    transposed_mode: bool = _field(False, _boolean)
    use_triton: bool = _field(False, _boolean)
    triton_autotune: bool = _field(False, _boolean)
    num_kv: int = _field(-1, _num_kv)
    rope_theta: float = _field(10000.0, _positive_float)
    invert_mask: bool = _field(True, _boolean)
    # DeepSpeed sets layer_id through TransformerConfig rather than the constructor.
    layer_id: int = _field(-1, _at_least(-1))
    # Ours: activation dtype for int8 weights (None: float16). For float dtypes it must be None or dtype.
    act_dtype: torch.dtype | None = _field(None, _act_dtype)

    def __post_init__(self):
        values = _validate({f.name: getattr(self, f.name) for f in _FIELDS})
        self.__dict__.update(values)
        self.__dict__["_validated"] = True
        self.__dict__["_version"] = 0

    @property
    def version(self) -> int:
        """Bumped by every field assignment: ops re-resolve their backend when it changes."""
        return self.__dict__["_version"]

    def __setattr__(self, name: str, value: Any) -> None:
        # During __init__ the dataclass assigns raw values; __post_init__ validates them all at once.
        if name in _FIELD_NAMES and self.__dict__.get("_validated"):
            values = {f.name: self.__dict__[f.name] for f in _FIELDS}
            values[name] = value
            self.__dict__.update(_validate(values))  # raises before anything changes
            self.__dict__["_version"] += 1
            return
        object.__setattr__(self, name, value)

    # --- derived values ---------------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """DeepSpeed stores `layer_norm_eps` under this name."""
        return self.layer_norm_eps

    @property
    def quantized(self) -> bool:
        """True for int8 weights (`dtype=torch.int8`)."""
        return self.dtype is torch.int8

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of inputs and outputs: `dtype`, or `act_dtype` (default float16) for int8 weights."""
        if self.dtype is torch.int8:
            return self.act_dtype or torch.float16
        return self.dtype

    # --- (de)serialisation ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True) -> "InferenceConfig":
        """Build a validated config from a dict (DeepSpeed's `epsilon` key is read as `layer_norm_eps`).

        Unknown keys raise `ConfigError` (strict, the default) or warn and are ignored (`strict=False`).
        """
        if not isinstance(values, dict):
            raise TypeError(f"InferenceConfig.from_dict expects a dict, got {type(values).__name__}")
        known: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            key = "layer_norm_eps" if key == "epsilon" else key
            if key in _FIELD_NAMES:
                known[key] = value
            else:
                unknown.append(key)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), _FIELD_NAMES, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            message = f"unknown key(s) {', '.join(hints)}"
            if strict:
                raise ConfigError(str(unknown[0]), message + "; pass strict=False to ignore them")
            warnings.warn(f"InferenceConfig.from_dict: ignoring {message}", stacklevel=2)
        return cls(**known)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike, *, strict: bool = True) -> "InferenceConfig":
        """Read a JSON object (as written by `to_dict`) and build a validated config."""
        with open(json_file, encoding="utf-8") as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError("json_file", f"{os.fspath(json_file)} is not valid JSON ({exc})") from None
        return cls.from_dict(doc, strict=strict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (dtypes and enums by name); `from_dict` reads it back."""
        out: dict[str, Any] = {}
        for f in _FIELDS:
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = _name(value)
            elif isinstance(value, enum.Enum):
                value = value.name
            out[f.name] = value
        return out


DeepSpeedInferenceConfig = InferenceConfig

_FIELDS = dataclasses.fields(InferenceConfig)
_FIELD_NAMES = tuple(f.name for f in _FIELDS)


def _validate(values: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise every field, then the rules that tie fields together."""
    out = {}
    for f in _FIELDS:
        try:
            out[f.name] = f.metadata["check"](values[f.name])
        except ValueError as exc:
            raise ConfigError(f.name, str(exc)) from None

    if out["intermediate_size"] <= 0 and out["hidden_size"] > 0:
        out["intermediate_size"] = 4 * out["hidden_size"]  # DeepSpeed's rule
    hidden, heads = out["hidden_size"], out["heads"]
    if hidden > 0 and heads > 0 and hidden % heads:
        raise ConfigError("heads", f"hidden_size={hidden} is not divisible by heads={heads}")
    if out["num_kv"] > 0 and heads > 0 and (out["num_kv"] > heads or heads % out["num_kv"]):
        raise ConfigError("num_kv", f"must be -1 or a divisor of heads={heads}, got {out['num_kv']}")
    if out["rotary_dim"] > 0:
        if hidden > 0 and heads > 0 and out["rotary_dim"] > hidden // heads:
            raise ConfigError("rotary_dim", f"must be <= head size hidden_size/heads={hidden // heads}, "
                                            f"got {out['rotary_dim']}")
        if not (out["rotate_half"] or out["rotate_every_two"]):
            raise ConfigError("rotate_every_two", "rotary_dim > 0 needs rotate_half=True (NeoX pairs) or "
                                                  "rotate_every_two=True (GPT-J pairs); both are False")
    if out["min_out_tokens"] > out["max_out_tokens"]:
        raise ConfigError("min_out_tokens", f"must be <= max_out_tokens={out['max_out_tokens']}, "
                                            f"got {out['min_out_tokens']}")
    act = out["act_dtype"]
    if act is not None and out["dtype"] is not torch.int8 and act is not out["dtype"]:
        raise ConfigError("act_dtype", f"only int8 weights take a separate activation dtype; with "
                                       f"dtype={_name(out['dtype'])} it must be None or the same, got {_name(act)}")
    return out
