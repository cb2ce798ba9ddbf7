"""InferenceConfig: DeepSpeed's names, order and defaults; validation at construction, assignment and load."""
from __future__ import annotations

import dataclasses
import enum
import json
import warnings

import pytest
import torch

import dsinf
from dsinf.config import ActivationFuncType, ConfigError, InferenceConfig, NormType

# DeepSpeed's DeepSpeedInferenceConfig constructor, in order, with its defaults
# (deepspeed/ops/transformer/inference/config.py, the plain class, not the pydantic one of the same name).
DEEPSPEED_DEFAULTS = [
    ("hidden_size", -1), ("intermediate_size", -1), ("heads", -1), ("num_hidden_layers", -1),
    ("layer_norm_eps", 1e-12), ("local_rank", -1), ("mp_size", 1), ("dtype", torch.float16),
    ("pre_layer_norm", True), ("norm_type", NormType.LayerNorm), ("stochastic_mode", False),
    ("scale_attention", True), ("triangular_masking", True), ("local_attention", False), ("window_size", 256),
    ("rotary_dim", -1), ("rotate_half", False), ("rotate_every_two", True), ("return_tuple", True),
    ("mlp_after_attn", True), ("mlp_act_func_type", ActivationFuncType.GELU), ("training_mp_size", 1),
    ("bigscience_bloom", False), ("max_out_tokens", 1024), ("min_out_tokens", 1),
    ("enable_qkv_quantization", False), ("use_mup", False), ("scale_attn_by_inverse_layer_idx", False),
    ("return_single_tuple", False), ("set_empty_params", False), ("transposed_mode", False), ("use_triton", False),
    ("triton_autotune", False), ("num_kv", -1), ("rope_theta", 10000), ("invert_mask", True),
]


def test_deepspeed_defaults_and_positional_order():
    cfg = InferenceConfig()
    names = [f.name for f in dataclasses.fields(InferenceConfig)]
    assert names[:len(DEEPSPEED_DEFAULTS)] == [n for n, _ in DEEPSPEED_DEFAULTS]
    for name, default in DEEPSPEED_DEFAULTS:
        assert getattr(cfg, name) == default, name
    assert cfg.layer_id == -1 and cfg.act_dtype is None
    assert cfg.epsilon == 1e-12  # DeepSpeed's attribute name for layer_norm_eps


def test_positional_call_like_deepspeed():
    cfg = InferenceConfig(768, 3000, 12, 24, 1e-5, 0, 1, torch.bfloat16)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.heads, cfg.num_hidden_layers) == (768, 3000, 12, 24)
    assert cfg.dtype is torch.bfloat16 and cfg.local_rank == 0


def test_alias_and_exports():
    assert dsinf.DeepSpeedInferenceConfig is dsinf.InferenceConfig is InferenceConfig
    assert issubclass(ConfigError, ValueError)


def test_intermediate_size_defaults_to_four_hidden():
    assert InferenceConfig(hidden_size=64).intermediate_size == 256
    assert InferenceConfig(hidden_size=64, intermediate_size=100).intermediate_size == 100
    assert InferenceConfig().intermediate_size == -1


@pytest.mark.parametrize("value,expected", [
    ("fp16", torch.float16), ("float16", torch.float16), ("torch.float16", torch.float16), ("half", torch.float16),
    ("bf16", torch.bfloat16), ("BFLOAT16", torch.bfloat16), ("fp32", torch.float32), ("float", torch.float32),
    ("int8", torch.int8), (torch.int8, torch.int8),
])
def test_dtype_names(value, expected):
    assert InferenceConfig(dtype=value).dtype is expected


def test_activation_dtype():
    assert InferenceConfig(dtype=torch.float32).activation_dtype is torch.float32
    assert InferenceConfig(dtype=torch.int8).activation_dtype is torch.float16  # DeepSpeed's int8 meaning
    cfg = InferenceConfig(dtype=torch.int8, act_dtype="bf16")
    assert cfg.activation_dtype is torch.bfloat16 and cfg.quantized
    assert InferenceConfig(dtype=torch.bfloat16, act_dtype=torch.bfloat16).activation_dtype is torch.bfloat16


BAD = [
    ("dtype", dict(dtype=torch.float64)),
    ("dtype", dict(dtype="float8")),
    ("dtype", dict(dtype=None)),
    ("act_dtype", dict(dtype=torch.int8, act_dtype=torch.int8)),
    ("act_dtype", dict(dtype=torch.float16, act_dtype=torch.bfloat16)),
    ("rope_theta", dict(rope_theta=0)),
    ("rope_theta", dict(rope_theta=-5.0)),
    ("rope_theta", dict(rope_theta=float("nan"))),
    ("rope_theta", dict(rope_theta=float("inf"))),
    ("rope_theta", dict(rope_theta="10000")),
    ("rotary_dim", dict(rotary_dim=7)),
    ("rotary_dim", dict(hidden_size=64, heads=8, rotary_dim=10)),  # > head size 8
    ("rotary_dim", dict(rotary_dim=4.0)),
    ("rotate_every_two", dict(rotary_dim=4, rotate_half=False, rotate_every_two=False)),
    ("num_kv", dict(num_kv=0)),
    ("num_kv", dict(num_kv=-2)),
    ("num_kv", dict(heads=8, num_kv=3)),
    ("num_kv", dict(heads=4, num_kv=8)),
    ("heads", dict(hidden_size=100, heads=8)),
    ("heads", dict(heads=0)),
    ("hidden_size", dict(hidden_size=-3)),
    ("max_out_tokens", dict(max_out_tokens=0)),
    ("min_out_tokens", dict(min_out_tokens=0)),
    ("min_out_tokens", dict(max_out_tokens=8, min_out_tokens=9)),
    ("mp_size", dict(mp_size=0)),
    ("layer_norm_eps", dict(layer_norm_eps=0.0)),
    ("window_size", dict(window_size=0)),
    ("layer_id", dict(layer_id=-2)),
    ("use_triton", dict(use_triton="false")),  # bool("false") is True: strings are refused
    ("transposed_mode", dict(transposed_mode=2)),
    ("heads", dict(heads=True)),
    ("norm_type", dict(norm_type="BatchNorm")),
    ("mlp_act_func_type", dict(mlp_act_func_type=17)),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_values_name_the_field(field, kwargs):
    with pytest.raises(ConfigError, match=f"field '{field}'") as info:
        InferenceConfig(**kwargs)
    assert info.value.field == field


def test_good_values_accepted():
    cfg = InferenceConfig(hidden_size=4096, heads=32, num_kv=8, rotary_dim=128, rotate_half=True, rope_theta=5e5,
                          max_out_tokens=4096, min_out_tokens=4096, dtype=torch.int8, act_dtype=torch.bfloat16,
                          rotate_every_two=False, norm_type="RMSNorm", mlp_act_func_type=4, use_triton=1)
    assert cfg.norm_type is NormType.RMSNorm and cfg.mlp_act_func_type is ActivationFuncType.GATED_SILU
    assert cfg.use_triton is True and cfg.rope_theta == 5e5


def test_deepspeed_enum_members_convert():
    class DSNormType(enum.IntEnum):  # stands in for deepspeed.utils.types.NormType
        LayerNorm = 1
        RMSNorm = 3

    assert InferenceConfig(norm_type=DSNormType.RMSNorm).norm_type is NormType.RMSNorm


def test_rotate_half_wins_over_rotate_every_two():
    cfg = InferenceConfig(rotary_dim=64, rotate_half=True)  # rotate_every_two keeps its default True
    assert cfg.rotate_half and cfg.rotate_every_two


def test_assignment_is_validated_and_atomic():
    cfg = InferenceConfig(heads=8, num_kv=2)
    with pytest.raises(ConfigError, match="field 'num_kv'"):
        cfg.num_kv = 3
    assert cfg.num_kv == 2
    with pytest.raises(ConfigError, match="field 'rope_theta'"):
        cfg.rope_theta = 0
    assert cfg.rope_theta == 10000
    cfg.layer_id = 0  # DeepSpeed's attention sets this after construction
    cfg.dtype = "bf16"
    assert cfg.layer_id == 0 and cfg.dtype is torch.bfloat16
    cfg.some_caller_attribute = 1  # not a field: allowed, as on DeepSpeed's plain class
    # several related fields at once: dataclasses.replace validates the result as a whole
    cfg2 = dataclasses.replace(cfg, heads=12, num_kv=3)
    assert (cfg2.heads, cfg2.num_kv) == (12, 3)


def test_from_dict_roundtrip_and_json(tmp_path):
    cfg = InferenceConfig(hidden_size=64, heads=4, num_kv=2, dtype=torch.int8, act_dtype=torch.bfloat16,
                          rotary_dim=16, rotate_half=True, rope_theta=1e6, norm_type=NormType.RMSNorm)
    data = cfg.to_dict()
    assert data["dtype"] == "int8" and data["act_dtype"] == "bfloat16" and data["norm_type"] == "RMSNorm"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    assert InferenceConfig.from_json_file(path) == cfg
    assert InferenceConfig.from_dict(data) == cfg


def test_from_dict_reads_deepspeed_epsilon():
    assert InferenceConfig.from_dict({"epsilon": 1e-5}).layer_norm_eps == 1e-5


def test_from_dict_unknown_key_is_an_error_with_a_hint():
    with pytest.raises(ConfigError, match="did you mean 'rope_theta'") as info:
        InferenceConfig.from_dict({"rope_thetha": 5e5})
    assert info.value.field == "rope_thetha"


def test_from_dict_non_strict_warns_and_ignores():
    with pytest.warns(UserWarning, match="rope_thetha"):
        cfg = InferenceConfig.from_dict({"rope_thetha": 5e5, "heads": 4}, strict=False)
    assert cfg.rope_theta == 10000 and cfg.heads == 4


def test_from_dict_validates_values(tmp_path):
    with pytest.raises(ConfigError, match="field 'rope_theta'"):
        InferenceConfig.from_dict({"rope_theta": -1})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"dtype": "float64"}))
    with pytest.raises(ConfigError, match="field 'dtype'"):
        InferenceConfig.from_json_file(path)
    path.write_text('{"dtype": ')
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        InferenceConfig.from_json_file(path)
    with pytest.raises(TypeError):
        InferenceConfig.from_dict([("heads", 4)])


def test_valid_config_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InferenceConfig.from_dict(InferenceConfig().to_dict())
