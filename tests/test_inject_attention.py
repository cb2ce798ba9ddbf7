"""dsinf.inject.attention: a grouped-query decode step without repeating the cache, against HF's own sdpa
attention on random inputs (masks: none, boolean with holes, additive float, one row broadcast)."""
from __future__ import annotations

import types

import pytest
import torch

import transformers  # the test extra installs it
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dsinf.inject import inject
from dsinf.inject import attention
from dsinf.inject.attention import decode_attention

HAS_CUDA = torch.cuda.is_available()


def attention_module(heads, kv, dim, implementation="sdpa"):
    config = types.SimpleNamespace(_attn_implementation=implementation)
    return types.SimpleNamespace(num_key_value_groups=heads // kv, scaling=dim ** -0.5 * 1.3, config=config,
                                 is_causal=True)


def inputs(batch, heads, kv, length, dim, mask, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    # HF's layout: the query a transposed view of the projection's [B, S, H, D]; the cache contiguous
    query = rand(batch, 1, heads, dim).transpose(1, 2)
    key, value = rand(batch, kv, length, dim), rand(batch, kv, length, dim)
    valid = torch.rand(batch, 1, 1, length, generator=g) > 0.3
    valid[..., 0] = True  # every row attends to something
    masks = {"none": None, "bool": valid, "float": torch.where(valid, 0.0, -1e4) * torch.rand(valid.shape, generator=g),
             "broadcast": valid[:1]}
    mask = masks[mask]
    return query, key, value, (mask.to(device=device, dtype=dtype if mask.dtype != torch.bool else torch.bool)
                               if mask is not None else None)


@pytest.mark.parametrize("mask", ["none", "bool", "float", "broadcast"])
@pytest.mark.parametrize("batch,heads,kv,length,dim", [(1, 4, 2, 13, 16), (3, 8, 2, 33, 32), (2, 6, 3, 7, 8)])
@pytest.mark.parametrize("gqa", [True, False], ids=["enable_gqa", "folded"])  # folded: a torch before 2.5
def test_equals_hf_sdpa(batch, heads, kv, length, dim, mask, gqa, monkeypatch):
    monkeypatch.setattr(attention, "_SDPA_GQA", gqa)
    module = attention_module(heads, kv, dim)
    query, key, value, attention_mask = inputs(batch, heads, kv, length, dim, mask)
    expected, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                         scaling=module.scaling)
    got = decode_attention(module, query, key, value, attention_mask, 0.0, {})
    assert got is not None and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why,change", [
    ("no groups", dict(heads=2, kv=2)),
    ("two query tokens", dict(tokens=2)),
    ("eager attention", dict(implementation="eager")),
    ("dropout", dict(dropout=0.1)),
    ("attention weights asked for", dict(kwargs={"output_attentions": True})),
    ("a per-query mask", dict(mask_rows=2)),
    ("a per-head mask", dict(mask_heads=4)),
    ("a position bias", dict(kwargs={"position_bias": torch.zeros(1, 4, 1, 9)})),
])
def test_declines_what_it_does_not_reproduce(why, change):
    heads, kv, dim = change.get("heads", 4), change.get("kv", 2), 8
    module = attention_module(heads, kv, dim, change.get("implementation", "sdpa"))
    query, key, value, mask = inputs(2, heads, kv, 9, dim, "bool")
    if "tokens" in change:
        query = torch.cat([query] * change["tokens"], dim=2)
    if "mask_rows" in change:
        mask = mask.expand(2, 1, change["mask_rows"], 9)
    if "mask_heads" in change:
        mask = mask.expand(2, change["mask_heads"], 1, 9)
    assert decode_attention(module, query, key, value, mask, change.get("dropout", 0.0),
                            change.get("kwargs", {})) is None, why


def sdpa_shapes(model, input_ids):
    """The (query, key) shapes SDPA saw over a two-token greedy generate with a static cache."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof, \
            torch.no_grad():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=2, do_sample=False,
                       cache_implementation="static")
    return [(tuple(e.input_shapes[0]), tuple(e.input_shapes[1])) for e in prof.events()
            if e.name == "aten::scaled_dot_product_attention"]


def test_injected_decode_reads_each_kv_head_once():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, pad_token_id=0, eos_token_id=None,
                                      bos_token_id=None)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(ref.state_dict())
    inject(model)
    x = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    shapes = sdpa_shapes(model, x)
    # prefill: [3, 4 heads, 5, 16] (HF's own call); the decode step: 4 query heads over the cache's 2 key heads,
    # never a key repeated to 4 heads
    queries = [q for q, _ in shapes]
    decode_keys = [k for q, k in shapes if q[2] == 1]
    assert (3, 4, 5, 16) in queries and decode_keys and all(k[1] == 2 for k in decode_keys), shapes
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, cache_implementation="static")
        got, expected = model.generate(x, **kwargs), ref.generate(x, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
    padded = torch.ones_like(x)
    padded[0, :2] = 0  # left padding: row 0's mask has holes in every decode step
    with torch.no_grad():
        kwargs["attention_mask"] = padded
        got, expected = model.generate(x, **kwargs), ref.generate(x, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_gpu_equals_hf_sdpa(dtype, mask):
    module = attention_module(32, 8, 128)
    query, key, value, attention_mask = inputs(8, 32, 8, 256, 128, mask, dtype=dtype, device="cuda")
    expected, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                         scaling=module.scaling)
    got = decode_attention(module, query, key, value, attention_mask, 0.0, {})
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-3)
