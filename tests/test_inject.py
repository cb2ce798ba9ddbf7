"""dsinf.inject on tiny Hugging Face models (hidden 64, 2 layers, vocab 128) and a plain MLP.

The oracle is always the unmodified model with the same weights (for int8: with the dequantized int8
weights, `export_state_dict`). fp32 tolerances are tight (only summation order differs); bf16 looser
(one rounding of q/k/v in a different place, and RoPE computed in fp32 rather than on bf16 cos/sin).
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import transformers  # the test extra installs it: a missing package is a failure, not a skip

from dsinf.inject import InjectedLinear, export_state_dict, init_inference, inject, injection_summary  # noqa: E402
from dsinf.inject.rope import RopePositions, RopeDecision  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, pad_token_id=0, eos_token_id=None, bos_token_id=None)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
}


def make_model(family="llama", dtype=torch.float32, device="cpu", seed=0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(device=device, dtype=dtype).eval()
    for p in model.parameters():  # HF inits biases to zero and norm weights to one: make them count
        if p.dim() == 1 and not torch.count_nonzero(p):
            p.data.normal_(0, 0.05)
        elif p.dim() == 1 and bool((p == 1).all()):
            p.data.uniform_(0.5, 1.5)
    return model


def twin(model):
    """A second model of the same class and config with the same weights."""
    other = type(model)(model.config).to(device=model.device, dtype=model.dtype).eval()
    other.load_state_dict(model.state_dict())
    return other


def ids(batch=2, seq=7, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, seq), generator=g).to(device)


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, use_cache=False, **kwargs).logits.float()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def greedy(model, input_ids, cache=None, **kwargs):
    extra = {"cache_implementation": cache} if cache else {}
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12,
                              do_sample=False, **extra, **kwargs)


# --- families ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_logits_and_generate_match_the_original(family):
    ref = make_model(family)
    model = inject(twin(ref))
    summary = injection_summary(model)
    assert sorted(f.kind for f in summary.fused) == ["attention", "attention", "layer", "layer", "mlp", "mlp"]
    assert summary.rope_fused
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(ref, x), atol=2e-5, rtol=1e-5)
    expected = greedy(ref, x)
    assert torch.equal(greedy(model, x), expected)  # DynamicCache
    assert torch.equal(greedy(model, x, cache="static"), greedy(ref, x, cache="static"))


def _op_calls(model, x) -> dict[str, int]:
    """How often each dsinf:: op ran in one forward (the profiler sees every dispatcher call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        model(x, use_cache=False)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("dsinf::")}


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_decoder_layer_runs_on_rms_norm_and_rms_mlp_gemm(quantize):
    ref = make_model("llama")
    model = inject(twin(ref), quantize=quantize)
    layers = model.model.layers
    assert all(layer._dsinf_calls is not None for layer in layers)
    calls = _op_calls(model, ids())
    mlp_ops = {k: n for k, n in calls.items() if "rms_mlp_gemm" in k}
    norm_ops = {k: n for k, n in calls.items() if k.startswith("dsinf::rms_norm")}
    assert sum(mlp_ops.values()) == len(layers), calls  # one MLPGemmOp per layer, not gate|up + down
    assert sum(norm_ops.values()) == len(layers), calls  # the input RMSNorm
    # o_proj per layer, and the output head (float, on dsinf's GEMV)
    assert sum(n for k, n in calls.items() if "vector_matmul" in k) == len(layers) + 1, calls
    assert not model.lm_head.quantized and model.lm_head.weight.dtype == ref.lm_head.weight.dtype
    x = ids()
    assert model(x, use_cache=False).logits.shape == logits(ref, x).shape  # grad mode on: runs all the same
    if quantize is None:
        torch.testing.assert_close(logits(model, x), logits(ref, x), atol=2e-5, rtol=1e-5)
    else:
        dequantized = twin(ref)
        dequantized.load_state_dict(export_state_dict(model))
        torch.testing.assert_close(logits(model, x), logits(dequantized, x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("skip,kept", [
    (("q_proj",), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (("up_proj",), ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]),
    (("layers.0",), [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "mlp.down_proj")]),
    (("self_attn",), [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj")]),
])
def test_skip_leaves_the_listed_modules_and_everything_in_them_on_torch(skip, kept):
    """A skipped projection that a fused block would replace (q/k/v, gate/up) keeps its block unfused, and a
    skipped container (a layer, every self_attn) keeps every linear inside it: all stay the model's own
    float nn.Linear, even under int8, and are reported as skipped, never as replaced."""
    ref = make_model("llama")
    model = inject(twin(ref), skip=skip, quantize="int8")
    summary = injection_summary(model)
    modules = dict(model.named_modules())
    for name in kept:
        assert type(modules[name]) is nn.Linear and modules[name].weight.dtype == torch.float32, name
        assert name not in summary.replaced and name in {s.name for s in summary.skipped}, name
    others = [n for n, m in modules.items() if n.endswith("_proj") and n not in kept and n not in
              {f"{f.name}.{p}" for f in summary.fused for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}]
    assert others and all(type(modules[n]) is not nn.Linear for n in others), others  # the rest still injected
    dequantized = twin(ref)
    dequantized.load_state_dict(export_state_dict(model))
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(dequantized, x), atol=2e-4, rtol=1e-4)


def test_skip_covers_norms_and_the_rotary_and_refuses_unknown_names():
    """A listed norm keeps its decoder layer unfused (the fused layer runs both norms on dsinf's ops), a listed
    rotary keeps HF's RoPE, both said in the summary, and the model computes as the un-injected one; a name
    matching no module (a typo) raises, naming it."""
    ref = make_model("llama")
    model = inject(twin(ref), skip=("input_layernorm", "rotary_emb"))
    summary = injection_summary(model)
    assert not any(f.kind == "layer" for f in summary.fused) and any(f.kind == "mlp" for f in summary.fused)
    assert any("decoder layer not fused: input_layernorm listed in skip" in s.reason for s in summary.skipped)
    assert not summary.rope_fused and summary.rope == "model.rotary_emb listed in skip: HF's rotary kept"
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(ref, x), atol=2e-5, rtol=1e-5)
    kept = injection_summary(inject(twin(ref), skip=("layers.1.post_attention_layernorm",)))
    assert [f.name for f in kept.fused if f.kind == "layer"] == ["model.layers.0"]
    with pytest.raises(ValueError, match="argument 'skip': 'lm_haed' names no module"):
        inject(twin(ref), skip=("lm_head", "lm_haed"))
    with pytest.raises(ValueError, match="'layers.9' names no module"):
        inject(twin(ref), skip=("layers.9",))
    with pytest.raises(ValueError, match="'' is the whole model"):
        inject(twin(ref), skip=("",))
    act = injection_summary(inject(twin(ref), skip=("layers.0.mlp.act_fn",)))  # SiLU runs in the fused MLP
    assert [f.name for f in act.fused if f.kind == "mlp"] == ["model.layers.1.mlp"]
    assert any("MLP not fused: act_fn listed in skip" in s.reason for s in act.skipped), act.skipped


def test_an_injected_model_moves_to_meta():
    """A move to the meta device (no values) keeps the RoPE decision rather than read frequencies there."""
    model = inject(make_model("llama"))
    model.to("meta")
    assert all(p.is_meta for p in model.parameters()) and injection_summary(model).rope_fused


def test_weights_inject_does_not_rewrite_are_named_in_the_summary():
    """An MoE model's stacked expert weights (3-D, not nn.Linear) stay on torch and in float under int8: the
    summary says so, with how many values, rather than report int8 on the linears alone."""
    cfg = transformers.MixtralConfig(**{**TINY, "num_local_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = inject(transformers.MixtralForCausalLM(cfg).eval(), quantize="int8")
    summary = injection_summary(model)
    experts = {s.name: s.reason for s in summary.skipped if s.name.endswith("mlp.experts")}
    values = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and p.dim() >= 2)
    assert len(experts) == 2 and values, summary.skipped
    per_layer = f"{values // 2:,} weight values"
    assert all(per_layer in r and "float (not quantized)" in r for r in experts.values()), experts
    assert "weight values" in summary.format()
    assert not [s for s in injection_summary(inject(make_model("llama"))).skipped if "weight values" in s.reason]
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=16, patch_size=8))
    reported = [s.name for s in injection_summary(inject(vit, quantize="int8")).skipped if "weight values" in s.reason]
    assert reported == ["embeddings.patch_embeddings.projection"], reported  # the conv; not cls_token/positions


def test_decoder_layer_follows_to_and_a_skipped_down_proj_keeps_it_unfused():
    ref = make_model("llama")
    model = inject(twin(ref))
    layer = model.model.layers[0]
    before = layer._dsinf_calls
    model.to(torch.bfloat16)
    assert layer._dsinf_calls is not None and layer._dsinf_calls is not before  # re-bound for bf16
    x = ids()
    assert rel_err(logits(model, x), logits(twin(ref).to(torch.bfloat16), x)) < 2e-2
    assert sum(n for k, n in _op_calls(model, x).items() if "rms_mlp_gemm_bf16" in k) == 2

    kept = inject(twin(ref), skip=("lm_head", "down_proj"))
    summary = injection_summary(kept)
    assert "layer" not in {f.kind for f in summary.fused}
    assert any("decoder layer not fused" in s.reason and "down_proj" in s.reason for s in summary.skipped)
    assert type(kept.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(logits(kept, x), logits(ref, x), atol=2e-5, rtol=1e-5)


def test_fused_rope_actually_runs_for_plain_positions_and_not_for_left_padding():
    positions, layer = RopePositions(RopeDecision(True, "test")), object()
    assert positions.offset(torch.arange(5, 9)[None].expand(3, 4), 4, layer) == 5
    assert positions.offset(torch.tensor([[0, 1, 2], [1, 2, 3]]), 3, layer) is None  # rows start apart (left padding)
    assert positions.offset(torch.tensor([[0, 2, 4]]), 3, layer) is None
    assert RopePositions(RopeDecision(False, "test")).offset(torch.arange(3)[None], 3, layer) is None


def test_a_position_buffer_updated_in_place_is_read_again_each_step():
    """The memo serves the other layers of one step; the layer that read the buffer reads it again at its next
    call, so a caller's buffer reused with `fill_` is never taken for the previous step's positions."""
    positions, first, second = RopePositions(RopeDecision(True, "test")), object(), object()
    pos = torch.tensor([[8]])
    assert positions.offset(pos, 1, first) == positions.offset(pos, 1, second) == 8
    pos.fill_(9)
    assert positions.offset(pos, 1, first) == 9 and positions.offset(pos, 1, second) == 9


def test_decode_loop_reusing_one_position_buffer_matches_the_original():
    """Prefill, then one token at a time with `position_ids` a buffer updated in place (a hand-written decode
    loop): the injected model's logits follow the original's at every step (the memo once kept step one's
    offset: 1.2e-2 relative error by the last step)."""
    ref = make_model("llama")
    model = inject(twin(ref))
    x = ids(batch=1, seq=20)

    def decode(m):
        cache, pos, out = transformers.DynamicCache(config=m.config), torch.zeros(1, 1, dtype=torch.long), []
        with torch.no_grad():
            m(x[:, :8], past_key_values=cache)
            for t in range(8, 20):
                pos.fill_(t)
                out.append(m(x[:, t:t + 1], position_ids=pos, past_key_values=cache).logits[0, -1])
        return torch.stack(out)

    got, want = decode(model), decode(ref)
    assert rel_err(got, want) < 1e-5, [rel_err(g, w) for g, w in zip(got, want)]


def test_fused_rope_equals_the_models_rotary_at_an_offset():
    # Logits cannot catch a constant position shift (RoPE attention depends on position differences only),
    # so compare q and k themselves: the epilogue at offset 5 vs the model's rotary at positions 5..5+S-1.
    model = inject(make_model("llama", rope_theta=500000.0))
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 6, 64)
    q, k, v = attn.qkv_proj(x, 5)
    q0, k0, v0 = attn.qkv_proj(x, None)
    cos, sin = model.model.rotary_emb(x, torch.arange(5, 11)[None])
    q_ref, k_ref = attn._dsinf_helpers[0](q0, k0, cos, sin)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v0)
    logits(model, ids())  # and a plain forward does take the fused path (offset 0 memoised)
    assert attn._dsinf_rope._offset == 0


def test_left_padded_batch_generates_like_the_original():
    ref = make_model("llama")
    model = inject(twin(ref))
    x = ids(batch=3, seq=8)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :1] = 0
    x = x.masked_fill(mask == 0, 0)
    with torch.no_grad():
        kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert torch.equal(model.generate(x, **kwargs), ref.generate(x, **kwargs))


def test_bf16_logits_close():
    ref = make_model("llama", dtype=torch.bfloat16)
    model = inject(twin(ref))
    x = ids()
    assert rel_err(logits(model, x), logits(ref, x)) < 2e-2


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_autocast_to_another_dtype_is_refused_with_the_way_out(dtype, autocast):
    """dsinf's ops compute in the weights' dtype: under an autocast to another one, the first dsinf op used
    to refuse the torch layers' autocast output naming only itself, or HF's RoPE failed inside torch's
    autocast. The model now says so before any layer runs, naming autocast and what to do."""
    model = inject(make_model("llama", dtype=dtype))
    name, wanted = str(dtype).replace("torch.", ""), str(autocast).replace("torch.", "")
    with torch.autocast("cpu", dtype=autocast), pytest.raises(
            RuntimeError, match=rf"computes in {name} .*torch.autocast\('cpu', dtype=torch.{wanted}\).*"
                                rf"dsinf.inject\(model, dtype=torch.{wanted}\)"):
        logits(model, ids())


def test_autocast_to_the_models_own_dtype_runs_and_matches():
    ref = make_model("llama", dtype=torch.bfloat16)
    model = inject(twin(ref))
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(logits(model, x), logits(ref, x)) < 2e-2


def test_inject_dtype_converts_the_model():
    ref = make_model("qwen2").to(torch.bfloat16)
    model = inject(make_model("qwen2"), dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert rel_err(logits(model, ids()), logits(ref, ids())) < 2e-2


def test_inject_dtype_keeps_the_rotary_frequencies_fp32_and_fuses_rope():
    """inject(dtype=) casts as from_pretrained(dtype=) loads: the rotary's inv_freq stays float32, so the fused
    RoPE (exact frequencies) runs; a model the user cast with .to() has rounded frequencies, which HF's rotary
    then uses, so the RoPE is not fused and the summary says why (not "inv_freq is not theta ** ...")."""
    model = inject(make_model("llama", rope_theta=500000.0), dtype=torch.bfloat16)
    summary = injection_summary(model)
    assert summary.rope_fused, summary.rope
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    ref = make_model("llama", rope_theta=500000.0)
    inv_freq = ref.model.rotary_emb.inv_freq
    ref.to(torch.bfloat16).model.rotary_emb.inv_freq = inv_freq  # the from_pretrained(dtype=bf16) model
    assert rel_err(logits(model, ids()), logits(ref, ids())) < 2e-2

    cast = inject(make_model("llama").to(torch.float16))
    summary = injection_summary(cast)
    assert not summary.rope_fused and "inv_freq is float16: the model was cast" in summary.rope, summary.rope


def test_a_cast_after_inject_decides_the_rope_again():
    """The fused RoPE computes exact frequencies; a model cast after inject (`.to(bfloat16)`) has HF's rotary
    on rounded ones, so fusion turns off and the summary says why; cast back to float32 the rounded
    frequencies stay rounded, and fusion stays off. The keys cached at positions 2000.. match HF's cast model
    (they were 14% off with the fusion kept, a review measured)."""
    ref = make_model("llama", max_position_embeddings=4096)
    model = inject(twin(ref))
    assert injection_summary(model).rope_fused
    model.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    summary = injection_summary(model)
    assert not summary.rope_fused and "then the model changed: inv_freq is bfloat16" in summary.rope, summary.rope
    x, pos = ids(seq=8), torch.arange(2000, 2008)[None].expand(2, -1)
    with torch.no_grad():
        keys = [m(x, position_ids=pos, use_cache=True).past_key_values.layers[0].keys.float() for m in (model, ref)]
    assert rel_err(*keys) < 1e-2
    model.float()
    assert not injection_summary(model).rope_fused


def test_the_rotary_serving_the_text_attention_is_the_one_checked():
    """A multimodal model holds a vision tower's rotary beside the text model's: the RoPE decision reads the
    rotary of the module that holds the attention, not the first one found."""
    from dsinf.inject.rope import rotary_module

    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.ones(4))
            self.attention_scaling = 1.0

    root = nn.Module()
    root.vision = nn.Module()
    root.vision.rotary_emb = Rotary()
    root.language_model = nn.Module()
    root.language_model.rotary_emb = Rotary()
    root.language_model.layers = nn.ModuleList([nn.Module()])
    root.language_model.layers[0].self_attn = nn.Linear(2, 2)
    assert rotary_module(root, "language_model.layers.0.self_attn") is root.language_model.rotary_emb
    assert rotary_module(root, "vision.blocks.0.attn") is root.vision.rotary_emb
    assert rotary_module(root) is root.vision.rotary_emb  # no attention named: the first


def test_scaled_rope_keeps_hf_rotary_and_says_so():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ref = make_model("llama", rope_parameters=rope)
    model = inject(twin(ref))
    summary = injection_summary(model)
    assert not summary.rope_fused and "llama3" in summary.rope
    assert len(summary.fused) == 6  # the GEMMs (and the decoder layers' norms + MLP) are still fused
    x = ids(seq=40)
    torch.testing.assert_close(logits(model, x), logits(ref, x), atol=2e-5, rtol=1e-5)
    assert torch.equal(greedy(model, x), greedy(ref, x))


def test_unknown_attention_gets_only_its_linears_replaced():
    ref = make_model("llama")
    ref.config.model_type = "not-a-llama"  # same structure, a model type whose forward we have not read
    model = inject(twin(ref))
    summary = injection_summary(model)
    assert not summary.fused
    reasons = {s.name: s.reason for s in summary.skipped}
    assert "not-a-llama" in reasons["model.layers.0.self_attn"]
    assert "model.layers.0.self_attn.q_proj" in summary.replaced
    assert isinstance(model.model.layers[0].self_attn.q_proj, InjectedLinear)
    torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), atol=2e-5, rtol=1e-5)


def test_qk_norm_attention_is_not_fused():
    config = transformers.Qwen3Config(**{**TINY, "head_dim": 16})
    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(config).eval()
    model = inject(twin(ref))
    reasons = [s.reason for s in injection_summary(model).skipped if s.name.endswith("self_attn")]
    assert reasons and all("q_norm" in r for r in reasons)
    torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), atol=2e-5, rtol=1e-5)


# --- generic models, int8, state -----------------------------------------------------------------

def mlp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(37, 64), nn.GELU(), nn.Linear(64, 48, bias=False), nn.Linear(48, 10)).eval()


@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 37), (2, 2, 3, 37)])
def test_generic_mlp_model(shape):
    ref = mlp_model()
    model = inject(mlp_model())
    assert injection_summary(model).replaced == ["0", "2", "3"]
    x = torch.randn(shape)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_save_pretrained_is_refused_with_the_way_back(tmp_path):
    """HF's save_pretrained would write the fused, int8 layout under the original architecture, which
    from_pretrained loads with those layers at random: refused, naming export_state_dict, and nothing written.
    The way it names works: the exported weights saved through the original class load back exactly."""
    ref = make_model("llama")
    model = inject(twin(ref), quantize="int8")
    with pytest.raises(RuntimeError, match="export_state_dict"):
        model.save_pretrained(tmp_path / "injected")
    assert not (tmp_path / "injected").exists()
    plain = twin(ref)
    plain.load_state_dict(export_state_dict(model))
    plain.save_pretrained(tmp_path / "exported")
    back = type(ref).from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(logits(back, ids()), logits(plain, ids()))


def test_gpt2_int8_summary_says_what_was_and_was_not_quantized():
    """GPT-2's projections are transformers' Conv1D, not nn.Linear: left to torch. Under quantize="int8" the
    only linear dsinf takes is the output head, which stays float; the summary says both, not "1 linear
    layers ... int8 weight-only"."""
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(config).eval()
    model = inject(twin(ref), quantize="int8")
    summary = injection_summary(model)
    assert summary.replaced == ["lm_head"] and summary.float_heads == ["lm_head"]
    conv = {s.name for s in summary.skipped if "Conv1D" in s.reason}
    assert "transformer.h.0.attn.c_attn" in conv and "transformer.h.1.mlp.c_proj" in conv, summary.skipped
    text = summary.format()
    assert "int8 weight-only (per channel) on 0 of them" in text and "Conv1D" in text, text
    torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int8_matches_the_dequantized_model(family, groups):
    model = inject(make_model(family), quantize="int8", groups=groups)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.int8 and qkv.weight_scale.dtype == torch.float32
    assert qkv.weight_scale.numel() == (groups or qkv.out_features)
    dequantized = make_model(family, seed=99)
    dequantized.load_state_dict(export_state_dict(model))
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(dequantized, x), atol=5e-5, rtol=1e-4)
    assert torch.equal(greedy(model, x), greedy(dequantized, x))


def test_export_in_fp32_keeps_the_int8_weights_unrounded():
    """export_state_dict(dtype=torch.float32) of a 16-bit int8 model: each weight is w_int8 * scale in fp32 (the
    default export rounds it to the activations' dtype), q|k|v split back; a bad dtype names the argument."""
    model = inject(make_model("llama", dtype=torch.float16), quantize="int8", groups=2)
    qkv = model.model.layers[0].self_attn.qkv_proj
    exact, rounded = export_state_dict(model, dtype=torch.float32), export_state_dict(model)
    rows = qkv.weight.shape[0]
    want = (qkv.weight.float().view(2, rows // 2, -1) * qkv.weight_scale.view(2, 1, 1)).view(rows, -1)
    q = exact["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float32 and torch.equal(q, want[:q.shape[0]])
    assert rounded["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert torch.equal(rounded["model.layers.0.self_attn.q_proj.weight"], q.half())
    assert not torch.equal(rounded["model.layers.0.self_attn.q_proj.weight"].float(), q)  # fp16 rounds
    with pytest.raises(ValueError, match="dtype"):
        export_state_dict(model, dtype=torch.int8)


def test_groups_must_divide_every_layer():
    with pytest.raises(ValueError, match="groups.*do not divide.*output rows"):
        inject(make_model("llama"), quantize="int8", groups=7)


def test_state_dict_round_trip_and_torch_save():
    a = inject(make_model("llama", seed=0), quantize="int8")
    b = inject(make_model("llama", seed=5), quantize="int8")
    x = ids()
    assert not torch.equal(logits(a, x), logits(b, x))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert any(k.endswith("qkv_proj.weight_scale") for k in state)
    b.load_state_dict(state)
    assert torch.equal(logits(a, x), logits(b, x))


def _round_trip(model, how):
    """`model` through a whole-model torch.save / torch.load, or pickle."""
    import pickle

    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_whole_injected_model_pickles_and_computes_as_saved(quantize, how):
    """inject gives modules classes made at run time (`llama.subclass`), which pickle cannot find by name: they are
    stored as the original class and the mixins and come back as the very classes inject made, with the same
    dsinf ops bound (equal outputs, not a fallback to torch); the result pickles, copies and casts again."""
    import copy
    import inspect

    from dsinf.inject.linear import InjectedQKV
    from dsinf.inject.llama import FusedAttention, FusedDecoderLayer, FusedMLP, _subclasses
    from dsinf.inject.rope import WatchedRotary

    model = inject(make_model("llama"), quantize=quantize)
    x = ids()
    expected, ops = logits(model, x), _op_calls(model, x)
    assert ops.get("dsinf::rms_mlp_gemm_fp32") == 2, ops  # the fused layers run on dsinf: the thing to keep
    restored = _round_trip(model, how)
    assert restored is not model and type(restored) is type(model) and type(model) in _subclasses.values()
    for mine, theirs in zip(restored.model.layers, model.model.layers):
        assert type(mine) is type(theirs) and isinstance(mine, FusedDecoderLayer) and mine._dsinf_calls is not None
        assert type(mine.self_attn) is type(theirs.self_attn) and isinstance(mine.self_attn, FusedAttention)
        assert type(mine.mlp) is type(theirs.mlp) and isinstance(mine.mlp, FusedMLP)
        qkv = mine.self_attn.qkv_proj
        assert type(qkv) is InjectedQKV and qkv.backend == "compiled" and qkv is not theirs.self_attn.qkv_proj
        assert qkv.weight.dtype == (torch.int8 if quantize else torch.float32)
        # HF's own helpers (its attention registry included), looked up again - not copies
        assert all(a is b for a, b in zip(mine.self_attn._dsinf_helpers, theirs.self_attn._dsinf_helpers))
    positions = restored.model.layers[0].self_attn._dsinf_rope  # one per model, shared as before, its own
    assert positions is restored.model.layers[1].self_attn._dsinf_rope is restored.model.rotary_emb._dsinf_positions
    assert positions is not model.model.layers[0].self_attn._dsinf_rope and positions.fused
    assert positions._ids is None and model.model.layers[0].self_attn._dsinf_rope._ids is not None  # step memo
    assert isinstance(restored.model.rotary_emb, WatchedRotary) and positions._summary is injection_summary(restored)
    assert injection_summary(restored).as_dict() == injection_summary(model).as_dict()
    assert "logits_to_keep" in inspect.signature(restored.forward).parameters  # the graphed forward's signature
    assert _op_calls(restored, x) == ops
    assert torch.equal(logits(restored, x), expected)
    assert torch.equal(greedy(restored, x), greedy(model, x))
    again = _round_trip(restored, how)  # pickled twice
    assert type(again) is type(model) and torch.equal(logits(again, x), expected)
    assert torch.equal(logits(copy.deepcopy(again), x), expected)
    again.to(torch.bfloat16)  # its own RoPE decision and summary follow the cast; the first copy's do not
    model.to(torch.bfloat16)
    assert not injection_summary(again).rope_fused and injection_summary(restored).rope_fused
    assert torch.equal(logits(again, x), logits(model, x))


FRESH_PROCESS_LOAD = r"""
import inspect, pickle, sys
from pathlib import Path

import torch
from transformers.generation.utils import DeferredStopCheck

from dsinf.inject import injection_summary, llama

for path in sorted(Path(sys.argv[1]).glob("*.pt")):
    saved = torch.load(path, weights_only=False)
    model, x = saved["model"], saved["x"]
    assert type(model) in llama._subclasses.values(), type(model)  # made here, by loading
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
    assert getattr(DeferredStopCheck.is_supported, "_dsinf_hf_rule", None) is not None  # HF's rule wrapped here too
    assert all(layer._dsinf_calls is not None for layer in model.model.layers)
    assert injection_summary(model).quantize == saved["quantize"]
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=False).logits.float(), saved["logits"]), path
    again = pickle.loads(pickle.dumps(model))
    assert type(again) is type(model) and type(again.model.layers[0]) is type(model.model.layers[0])
print("loaded", len(list(Path(sys.argv[1]).glob("*.pt"))))
"""


def test_an_injected_model_saved_whole_loads_in_a_fresh_process(tmp_path):
    """Where inject never ran, loading makes the classes (no cache to find them in): the graphed forward gets the
    model's signature, HF's stop rule is wrapped, the fused layers bind, and the outputs are the saved model's."""
    import os
    import subprocess
    import sys

    x = ids()
    for quantize in (None, "int8"):
        model = inject(make_model("llama"), quantize=quantize)
        torch.save({"model": model, "x": x, "logits": logits(model, x), "quantize": quantize},
                   tmp_path / f"{quantize}.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "loaded 2" in done.stdout, done.stderr[-3000:]


def test_a_pickled_model_that_cannot_be_restored_says_to_save_the_state_dict(monkeypatch):
    """Loaded under a transformers whose modeling module lacks a helper the fused attention calls: a clear error
    with the way out, not an AttributeError from inside pickle."""
    import pickle

    from transformers.models.llama import modeling_llama

    data = pickle.dumps(inject(make_model("llama")))
    monkeypatch.delattr(modeling_llama, "apply_rotary_pos_emb")
    with pytest.raises(RuntimeError, match=r"DsinfLlamaAttention.*apply_rotary_pos_emb.*state_dict\(\)"):
        pickle.loads(data)


def test_to_keeps_int8_scales_float32_and_rebinds():
    model = inject(make_model("llama"), quantize="int8")
    model.to(torch.bfloat16)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.int8 and qkv.weight_scale.dtype == torch.float32
    assert qkv.decision.request.act_dtype == torch.bfloat16
    dequantized = make_model("llama", seed=99)
    dequantized.load_state_dict(export_state_dict(model))
    assert rel_err(logits(model, ids()), logits(dequantized.to(torch.bfloat16), ids())) < 2e-2


def test_float_weights_are_shared_not_copied():
    model = make_model("llama", tie_word_embeddings=True)
    o_proj = model.model.layers[0].self_attn.o_proj.weight
    inject(model, skip=())
    assert model.model.layers[0].self_attn.o_proj.weight is o_proj
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie survives


def test_reassigned_weights_reach_the_hot_path():
    model = inject(mlp_model())
    new = torch.randn(64, 37)
    model[0].weight = nn.Parameter(new)  # the bound call holds tensors: reassignment must rebuild it
    assert not model[0].weight.requires_grad  # inference modules: as at injection (grad mode is on here)
    model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()}, assign=True)
    x = torch.randn(3, 37)
    expected = x
    for i in (0, 1, 2, 3):
        layer = model[i]
        expected = torch.nn.functional.linear(expected, layer.weight, layer.bias) if i != 1 else layer(expected)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# --- API ------------------------------------------------------------------------------------------

def test_summary_is_data():
    model = inject(make_model("mistral"), quantize="int8")
    summary = injection_summary(model).as_dict()
    assert summary["quantize"] == "int8" and summary["groups"] is None
    assert len(summary["replaced"]) == 2 * 7 + 1 and "lm_head" in summary["replaced"]
    assert {f["kind"] for f in summary["fused"]} == {"attention", "mlp", "layer"}
    assert summary["skipped"] == []
    assert sum(summary["backends"].values()) == 2 * 4 + 1
    kept = injection_summary(inject(make_model("mistral"), skip=("lm_head",))).as_dict()
    assert kept["skipped"] == [{"name": "lm_head", "reason": "listed in skip"}]
    with pytest.raises(ValueError, match="not injected"):
        injection_summary(make_model("llama"))
    with pytest.raises(ValueError, match="already injected"):
        inject(model)


def test_inject_logs_one_summary_and_nothing_per_call(caplog):
    model = make_model("llama")
    with caplog.at_level("DEBUG", logger="dsinf"):
        inject(model)
        count = len(caplog.records)
        logits(model, ids())
    assert count == 1 and "fused 2 attention blocks" in caplog.records[0].getMessage()
    assert len(caplog.records) == count


def test_the_package_is_callable_like_the_function():
    import dsinf.inject as package

    assert injection_summary(package(make_model("llama"))).fused


@pytest.mark.parametrize("kwargs, error, match", [
    ({"tensor_parallel": {"tp_size": 2}}, ValueError, "tensor-parallel size 2"),
    ({"mp_size": 4}, ValueError, "tensor-parallel size 4"),
    ({"max_out_tokens": 512}, ValueError, "no KV workspace"),
    ({"enable_cuda_graph": 1}, ValueError, "enable_cuda_graph"),
    ({"replace_with_kernel_injection": True}, TypeError, "did you mean 'replace_with_kernel_inject'"),
    ({"quant": {"enabled": True, "weight": {"num_bits": 4}}}, ValueError, "num_bits=4"),
    ({"quant": {"enabled": True, "weight": [8]}}, TypeError, "argument 'quant': 'weight' must be a dict"),
    ({"dtype": "float64"}, ValueError, "dtype"),
])
def test_init_inference_refuses_what_it_cannot_do(kwargs, error, match):
    with pytest.raises(error, match=match):
        init_inference(make_model("llama"), **kwargs)


def test_init_inference_ignores_quant_groups_while_quantization_is_off():
    summary = injection_summary(init_inference(make_model("llama"), quant={"enabled": False,
                                                                         "weight": {"q_groups": 2}}))
    assert summary.quantize is None
    model = init_inference(make_model("llama"), dtype=torch.int8, quant={"enabled": False, "weight": {"q_groups": 2}})
    assert injection_summary(model).quantize == "int8"  # dtype int8 turns it on: the groups then apply
    assert model.model.layers[0].mlp.down_proj.weight_scale.numel() == 2


def test_init_inference_deepspeed_keywords():
    model = init_inference(make_model("llama"), dtype=torch.int8, replace_with_kernel_inject=True,
                           tensor_parallel={"tp_size": 1})
    summary = injection_summary(model)
    assert summary.quantize == "int8" and summary.fused
    assert not summary.cuda_graph and not hasattr(model, "_dsinf_graphs")  # DeepSpeed's default: no graphs
    assert injection_summary(init_inference(make_model("llama"), enable_cuda_graph=True)).cuda_graph
    model = init_inference(make_model("llama"), config={"dtype": "bf16", "replace_with_kernel_inject": False})
    summary = injection_summary(model)
    assert summary.dtype == "bfloat16" and not summary.fused and len(summary.replaced) == 15  # 2 x 7, the head


# --- the compiled backend, torch.compile ---------------------------------------------------------

def test_the_compiled_backend_is_what_runs():
    model = inject(make_model("llama"))
    assert {m.backend for m in model.modules() if isinstance(m, InjectedLinear)} == {"compiled"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits(model, ids())
    names = {e.key for e in prof.key_averages()}
    assert "dsinf::linear_layer_fp32" in names and "dsinf::vector_matmul_fp32" in names


def test_torch_compile_fullgraph():
    ref = make_model("qwen2")
    model = inject(twin(ref), quantize="int8")
    dequantized = twin(ref)
    dequantized.load_state_dict(export_state_dict(model))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = ids()
    torch.testing.assert_close(logits(compiled, x), logits(dequantized, x), atol=5e-5, rtol=1e-4)


# --- GPU versions of the key tests (the lead runs them on the device) --------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gpu_family_logits_and_generate(family, dtype):
    ref = make_model(family, dtype=dtype, device="cuda")
    model = inject(twin(ref))
    assert {m.backend for m in model.modules() if isinstance(m, InjectedLinear)} == {"compiled"}
    x = ids(device="cuda")
    assert rel_err(logits(model, x), logits(ref, x)) < 1e-2
    out = greedy(model, x)
    assert out.shape == greedy(ref, x).shape
    assert greedy(model, x, cache="static").shape == out.shape


@gpu
def test_gpu_int8_matches_dequantized_and_compiles():
    model = inject(make_model("llama", dtype=torch.float16, device="cuda"), quantize="int8")
    dequantized = make_model("llama", dtype=torch.float16, device="cuda", seed=99)
    dequantized.load_state_dict(export_state_dict(model))
    x = ids(device="cuda")
    assert rel_err(logits(model, x), logits(dequantized, x)) < 1e-2
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # CUDA graphs: record, then replay
        assert rel_err(logits(compiled, x), logits(dequantized, x)) < 1e-2


@gpu
def test_gpu_to_cuda_after_inject():
    ref = make_model("llama")
    model = inject(twin(ref), quantize="int8").to("cuda", torch.float16)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight_scale.is_cuda and qkv.weight_scale.dtype == torch.float32 and qkv.backend == "compiled"
    dequantized = make_model("llama", seed=99)
    dequantized.load_state_dict(export_state_dict(model))
    x = ids()
    assert rel_err(logits(model, x.cuda()).cpu(), logits(dequantized.to("cuda", torch.float16), x.cuda()).cpu()) < 1e-2


def test_a_deepcopy_of_an_injected_model_computes_with_its_own_weights():
    """The fused decoder layer's bound ops read the weights of the layer they are called with: a copy whose
    weights change (or the original's, after copying) computes with its own, as the un-injected model does."""
    import copy

    model = inject(make_model("llama"))
    assert any(f.kind == "layer" for f in injection_summary(model).fused)  # the fused decoder layer ran
    clone = copy.deepcopy(model)
    x = ids()
    before = logits(clone, x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(logits(clone, x), before, rtol=0, atol=0)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(logits(clone, x), logits(model, x), rtol=0, atol=0)


# --- decode steps on CUDA graphs ---------------------------------------------------------------------

def test_graphed_decode_keeps_the_forward_signature_and_copies_cleanly():
    import copy
    import inspect
    import pickle

    model = inject(make_model("llama"))
    assert model.generation_config.disable_compile  # the graphs replace HF's compile of the decode step
    assert "logits_to_keep" in inspect.signature(model.forward).parameters  # HF reads it from the signature
    assert "CUDA graphs" in injection_summary(model).format()
    clone = copy.deepcopy(model)
    assert clone._dsinf_graphs is not model._dsinf_graphs and not clone._dsinf_graphs.graphs
    assert pickle.loads(pickle.dumps(model._dsinf_graphs)).replays == 0
    x = ids()
    torch.testing.assert_close(logits(clone, x), logits(model, x))
    assert model._dsinf_graphs.replays == 0  # CPU: every call is the model's own forward
    plain = inject(make_model("llama"), cuda_graph=False)
    assert not hasattr(plain, "_dsinf_graphs") and not plain.generation_config.disable_compile
    with pytest.raises(TypeError, match="cuda_graph"):
        inject(make_model("llama"), cuda_graph="yes")
    with pytest.raises(TypeError, match="cuda_graph"):
        inject(make_model("llama"), cuda_graph="compile")
    assert model._dsinf_graphs.compiled and "inductor-compiled" in injection_summary(model).cuda_graph
    assert copy.deepcopy(model)._dsinf_graphs.compiled
    eager_step = inject(make_model("llama"), cuda_graph="eager")
    assert not eager_step._dsinf_graphs.compiled and "the eager step" in injection_summary(eager_step).cuda_graph


@gpu
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gpu_graphed_compiled_decode_equals_eager_steps(quantize):
    # fp32: inductor's fused small ops round like eager's, so greedy tokens on a random model stay equal
    ref = make_model("llama", dtype=torch.float32, device="cuda")
    graphed = inject(twin(ref), quantize=quantize)  # the default: graphs of an inductor-compiled step
    eager = inject(twin(ref), quantize=quantize, cuda_graph=False)
    eager.generation_config.disable_compile = True
    x = ids(device="cuda")
    torch._dynamo.reset()
    expected = greedy(eager, x, cache="static")
    assert torch.equal(greedy(graphed, x, cache="static"), expected)
    assert torch.equal(greedy(graphed, x, cache="static"), expected)
    runner = graphed._dsinf_graphs
    assert runner.captures == 1 and runner.adoptions == 1 and runner.replays == 10 + 11
    assert runner.compiled and not runner.fallback  # the compiled step is what the graph holds


def test_graphs_only_take_caches_a_replay_advances():
    from dsinf.inject.graphs import _cache_state

    def prefilled_cache(family, **overrides):
        model = make_model(family, **overrides)
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(ids(), past_key_values=cache, use_cache=True)
        return cache

    assert _cache_state(prefilled_cache("llama")) is not None
    # a sliding-window layer keeps a host int (its length) that a replay would freeze
    assert _cache_state(prefilled_cache("mistral", sliding_window=4)) is None
    assert _cache_state(transformers.StaticCache(config=make_model("llama").config, max_cache_len=16)) is None
    assert _cache_state(transformers.DynamicCache()) is None


def test_graphs_fall_back_only_for_compile_errors():
    from dsinf.inject.graphs import _compile_errors, _reason

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    def failing_at_run_time(gm, example_inputs):
        def run(*args):
            raise torch.OutOfMemoryError("out of memory while running")
        return run

    with pytest.raises(Exception) as compile_failure:
        torch.compile(lambda x: x + 1, backend=broken_backend)(torch.ones(2))
    with pytest.raises(Exception) as run_failure:
        torch.compile(lambda x: x * 2, backend=failing_at_run_time)(torch.ones(2))
    assert isinstance(compile_failure.value, _compile_errors())
    assert not isinstance(run_failure.value, _compile_errors())  # re-raised, never a silent fallback
    assert _reason(compile_failure.value).endswith("<- RuntimeError: backend exploded")
    try:
        try:
            raise KeyError("handled")
        except KeyError:
            raise ValueError("the real error")
    except ValueError as exc:
        assert _reason(exc) == "ValueError: the real error"  # a handled exception is not its cause


@gpu
def test_gpu_graphed_decode_raises_what_the_compiled_step_raises():
    model = inject(make_model("llama", dtype=torch.float16, device="cuda"))

    def failing_at_run_time(gm, example_inputs):
        def run(*args):
            raise torch.OutOfMemoryError("out of memory while running")
        return run

    torch._dynamo.reset()
    model._dsinf_graphs.backend = failing_at_run_time
    with pytest.raises(torch.OutOfMemoryError):
        greedy(model, ids(device="cuda"), cache="static")
    assert model._dsinf_graphs.compiled and not model._dsinf_graphs.fallback


@gpu
def test_gpu_graphed_decode_falls_back_to_the_eager_step_when_compile_fails(caplog):
    ref = make_model("llama", dtype=torch.float16, device="cuda")
    graphed = inject(twin(ref))
    eager = inject(twin(ref), cuda_graph=False)
    eager.generation_config.disable_compile = True

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    torch._dynamo.reset()
    graphed._dsinf_graphs.backend = broken_backend  # a real torch.compile whose backend fails
    x = ids(device="cuda")
    with caplog.at_level("WARNING", logger="dsinf"):
        assert torch.equal(greedy(graphed, x, cache="static"), greedy(eager, x, cache="static"))
    runner = graphed._dsinf_graphs
    assert not runner.compiled and "backend exploded" in runner.fallback and "could not be compiled" in caplog.text
    line = injection_summary(graphed).cuda_graph  # the summary says what runs now
    assert "the eager step" in line and "backend exploded" in line and "inductor-compiled" not in line
    assert runner.captures == 1 and runner.replays == 11 - 1  # the eager step, graphed


@gpu
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gpu_graphed_decode_equals_eager_steps(quantize):
    ref = make_model("llama", dtype=torch.float16, device="cuda")
    graphed = inject(twin(ref), quantize=quantize, cuda_graph="eager")
    eager = inject(twin(ref), quantize=quantize, cuda_graph=False)
    eager.generation_config.disable_compile = True  # the oracle: the same kernels, launched one by one
    x = ids(device="cuda")
    expected = greedy(eager, x, cache="static")
    assert torch.equal(greedy(graphed, x, cache="static"), expected)
    runner = graphed._dsinf_graphs
    assert runner.replays == 11 - 1 and len(runner.graphs) == 1  # one eager warm-up step, then the graph
    replays = runner.replays
    # A new generate makes a new StaticCache: it adopts the graph's cache tensors, no second capture.
    assert torch.equal(greedy(graphed, x, cache="static"), expected)
    assert runner.replays == replays + 11 and runner.captures == 1 and runner.adoptions == 1
    assert torch.equal(greedy(graphed, x), greedy(eager, x))  # DynamicCache: never graphed
    assert runner.replays == replays + 11
    graphed.to(torch.bfloat16)  # weights move: the graphs are dropped, not replayed on freed memory
    eager.to(torch.bfloat16)
    assert torch.equal(greedy(graphed, x, cache="static"), greedy(eager, x, cache="static"))


# --- generate's stop check one step behind on CUDA ---------------------------------------------------

def _deferral_answers(model, **generate_kwargs) -> list[bool]:
    """What HF's DeferredStopCheck.is_supported answers for a CUDA device while `model.generate` runs (asked
    from a logits processor, inside the decoding loop), and outside it."""
    from transformers.generation.utils import DeferredStopCheck

    def ask(cache=None, cache_is_returned=False, is_assistant=False):
        return DeferredStopCheck.is_supported(torch.device("cuda"), cache, cache_is_returned, is_assistant=is_assistant)

    class Ask(transformers.LogitsProcessor):
        answers: list = []

        def __call__(self, input_ids, scores):
            static = transformers.StaticCache(config=model.config, max_cache_len=8)  # not croppable
            self.answers.append((ask(), ask(is_assistant=True), ask(static, cache_is_returned=True),
                                 ask(static, cache_is_returned=False),
                                 DeferredStopCheck.is_supported(torch.device("cpu"), None, False, is_assistant=False)))
            return scores

    processor = Ask()
    greedy(model, ids(), logits_processor=transformers.LogitsProcessorList([processor]), **generate_kwargs)
    assert len(processor.answers) == 12
    assert len(set(processor.answers)) == 1  # every step the same
    return [*processor.answers[0], ask()]


def test_injected_generate_defers_its_stop_check_on_cuda_only():
    model = inject(make_model("llama"))
    assert "one step late" in injection_summary(model).stop_check
    assert "one step late" in injection_summary(model).format()
    assert type(model).__name__ == "DsinfLlamaForCausalLM"  # one subclass name for both mixins
    # inside the injected model's generate: CUDA deferred, by HF's own rule for assisted generation and
    # for a returned cache that cannot be cropped; the CPU and everything outside: HF's answer (no)
    assert _deferral_answers(model) == [True, False, False, True, False, False]
    assert _deferral_answers(make_model("llama")) == [False] * 6  # a model without dsinf: HF's answer
    off = inject(make_model("llama"), defer_stop=False)
    assert not injection_summary(off).stop_check and _deferral_answers(off) == [False] * 6
    no_graphs = inject(make_model("llama"), cuda_graph=False)  # the two are independent
    assert _deferral_answers(no_graphs)[0] and not hasattr(no_graphs, "_dsinf_graphs")
    with pytest.raises(TypeError, match="defer_stop"):
        inject(make_model("llama"), defer_stop=1)


def test_the_head_left_to_torch_runs_one_gemm_on_a_prompt_s_last_tokens():
    """inject freezes every parameter, and torch's matmul with a frozen weight runs a 3-D input whose leading
    dims are not contiguous (HF's lm_head on `hidden[:, -1:, :]`) as a batched GEMM over the weight expanded
    per row, reading it once per row. A head left to torch (skip) keeps one GEMM, and its values."""
    from torch.profiler import ProfilerActivity, profile

    ref = make_model("llama")
    model = inject(twin(ref), skip=("lm_head",))
    head = model.lm_head
    assert type(head) is nn.Linear and not head.weight.requires_grad
    x = torch.randn(4, 7, head.in_features)[:, -1:, :]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = head(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mm" in ops and "aten::bmm" not in ops, ops
    torch.testing.assert_close(out, ref.lm_head(x), rtol=0, atol=0)
    assert len(head._forward_pre_hooks) == 1


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_output_head_runs_on_dsinf_in_its_float_dtype(quantize):
    """The head (HF's get_output_embeddings(), lm_head) is replaced like any linear, but never quantized: int8
    rounding hurts the logits most. Its weight stays the original Parameter (a tie to the embedding survives);
    a prompt's last token per row reaches it sliced, and its values match HF's head."""
    ref = make_model("llama", tie_word_embeddings=True)
    model = inject(twin(ref), quantize=quantize)
    head = model.lm_head
    assert isinstance(head, InjectedLinear) and not head.quantized and head.backend == "compiled"
    assert head.weight is model.model.embed_tokens.weight
    summary = injection_summary(model)
    if quantize:
        assert model.model.layers[0].self_attn.o_proj.quantized
        assert summary.float_heads == ["lm_head"] and "lm_head on dsinf in float32, not quantized" in summary.format()
    else:
        assert summary.float_heads == [] and "not quantized" not in summary.format()
    x = torch.randn(4, 7, head.in_features)[:, -1:, :]
    torch.testing.assert_close(head(x), ref.lm_head(x), atol=2e-5, rtol=1e-5)
    # the groups must divide the quantized layers' rows only: not a 129-word head's
    assert injection_summary(inject(make_model("llama", vocab_size=129), quantize="int8", groups=2)).groups == 2


def test_a_model_on_the_meta_device_is_refused_before_anything_changes():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="argument 'model': its parameters are not materialised .*meta device"):
        inject(model, quantize="int8")
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("skip", [None, "lm_head", 3, ("lm_head", 3)])
def test_a_bad_skip_names_the_argument(skip):
    with pytest.raises(TypeError, match="argument 'skip'"):
        inject(make_model("llama"), skip=skip)


def test_an_injected_linear_names_an_input_of_the_wrong_width():
    """A 3-D input goes to the op, which names it; any other rank is reshaped first, so the width is checked
    there (a reshape's own error would not say which argument)."""
    from dsinf.checks import InputError

    model = inject(make_model("llama"), fuse=False)
    linear = model.model.layers[0].mlp.down_proj
    K = linear.in_features
    assert linear(torch.randn(5, K)).shape == (5, linear.out_features)
    for shape in ((5, K + 1), (2, 3, 4, K - 1), ()):
        with pytest.raises(InputError, match="argument 'input'"):
            linear(torch.randn(shape))
    with pytest.raises(ValueError, match="input"):
        linear(torch.randn(1, 5, K + 1))


def test_the_deferral_wraps_hf_rule_once_and_keeps_it():
    from transformers.generation.utils import DeferredStopCheck

    from dsinf.inject import stopcheck

    rule = DeferredStopCheck.is_supported._dsinf_hf_rule
    for _ in range(2):
        inject(make_model("llama"))
    assert DeferredStopCheck.is_supported._dsinf_hf_rule is rule  # wrapped once, not around itself
    assert rule(torch.device("mps"), None, False, is_assistant=False)  # HF's rule, unchanged, defers on mps
    assert not rule(torch.device("cuda"), None, False, is_assistant=False)
    assert not stopcheck.install(nn.Linear(2, 2), lambda m, mixin: None)  # no HF decoding loop: nothing done
    assert _deferral_answers(inject(make_model("qwen2")))[0]  # any family with HF's loop


@gpu
@pytest.mark.parametrize("cache", [None, "static"])
def test_gpu_deferred_stop_generates_what_the_synchronous_loop_does(cache, monkeypatch):
    from transformers.generation import utils as generation

    calls = {"deferred": 0}
    deferred_call = generation.DeferredStopCheck.__call__

    def counting(self, *args, **kwargs):
        calls["deferred"] += 1
        return deferred_call(self, *args, **kwargs)

    monkeypatch.setattr(generation.DeferredStopCheck, "__call__", counting)
    ref = make_model("llama", dtype=torch.float16, device="cuda")
    deferred = inject(twin(ref))
    synchronous = inject(twin(ref), defer_stop=False)
    x = ids(device="cuda")
    plain = greedy(synchronous, x, cache=cache)
    assert calls["deferred"] == 0
    assert torch.equal(greedy(deferred, x, cache=cache), plain)  # stops at max_new_tokens: decided on the host
    assert calls["deferred"] == 12
    # an end-of-sequence token that row 0 generates early: the deferred loop learns of the stop a step late,
    # runs one more step (one more check) and undoes it
    eos = int(plain[0, x.shape[1] + 3])
    kwargs = dict(eos_token_id=eos, pad_token_id=0)
    for rows in (x[:1], x):  # one row: the whole generate stops early; two: row 1 goes on, padded after
        expected = greedy(synchronous, rows, cache=cache, **kwargs)  # the stop
        assert expected.shape[1] < plain.shape[1] or rows.shape[0] == 2
        calls["deferred"] = 0
        assert torch.equal(greedy(deferred, rows, cache=cache, **kwargs), expected)
        assert calls["deferred"] == expected.shape[1] - rows.shape[1] + (expected.shape[1] < plain.shape[1])
    # outputs with the cache returned: a static cache cannot be cropped, so HF's rule keeps that loop
    # synchronous; a dynamic cache is cropped back after the extra step (one row: the stop comes late)
    for rows in (x[:1], x):
        calls["deferred"] = 0
        out = greedy(deferred, rows, cache=cache, return_dict_in_generate=True, output_scores=True, **kwargs)
        ref_out = greedy(synchronous, rows, cache=cache, return_dict_in_generate=True, output_scores=True, **kwargs)
        assert torch.equal(out.sequences, ref_out.sequences) and len(out.scores) == len(ref_out.scores)
        assert (calls["deferred"] > 0) == (cache is None)
        assert out.past_key_values.get_seq_length() == ref_out.past_key_values.get_seq_length()
        if cache is None:
            for mine, theirs in zip(out.past_key_values.layers, ref_out.past_key_values.layers):
                torch.testing.assert_close(mine.keys, theirs.keys)  # the extra step's entries are gone
