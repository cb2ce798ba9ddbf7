"""The compiled path is what runs on the test machine, for every op.

The test machine has a CPU and a C++ compiler, so the real dispatch (no fake environment, no forced
backend) must resolve the compiled backend for every op spec, every CPU activation dtype, float and
int8 weights - with no fallback - and the op classes must resolve it (that they then run the compiled
kernel, not the reference, test_host_cost, test_rms_norm and test_mlp_gemm check with the profiler).
A dispatch bug that misses the compiled kernels would otherwise turn every compiled-backend test into a
silent pass on the reference.
The ops come from the spec registry: an op added later is covered without editing this file. On a
GPU machine (`-m gpu`) the same holds for CUDA tensors (bf16 from compute capability 8.0).
"""
from __future__ import annotations

import pytest
import torch

from dsinf import dispatch
from dsinf.config import ActivationFuncType, InferenceConfig, NormType
from dsinf.ops import spec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = [pytest.param(op, dtype, int8, id=f"{op}-{suffix}-{'int8' if int8 else 'float'}")
         for op in spec.specs() for suffix, dtype in DTYPES.items() for int8 in (False, True)]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def automatic_choice(monkeypatch):
    monkeypatch.delenv("DSINF_BACKEND", raising=False)  # the real, automatic choice
    monkeypatch.setenv("DS_KI_FALLBACK", "0")  # a fallback raises, naming why


def test_every_op_is_covered():
    assert {"linear_layer", "vector_matmul"} <= set(spec.specs())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("op,dtype,int8", CASES)
def test_real_dispatch_resolves_compiled(op, dtype, int8, device):
    if device == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"bf16 kernels need compute capability 8.0; this GPU has {torch.cuda.get_device_capability()}")
    request = dispatch.Request(op=op, device_type=device, act_dtype=dtype, int8=int8)
    decision = dispatch.resolve(request)
    assert decision.backend == "compiled" and not decision.forced, decision.explain()
    assert decision.fallbacks == (), decision.explain()
    # What runs is the registered kernel itself, not something labelled "compiled".
    assert decision.impl is getattr(torch.ops.dsinf, spec.get(op).function(dtype)).default


@pytest.mark.parametrize("op,dtype,int8", CASES)
def test_op_class_resolves_compiled(op, dtype, int8):
    cls = spec.op_class(spec.get(op).op_class)
    # norm_type, mlp_act_func_type: MLPGemmOp implements DeepSpeed's RMSNorm variant only; the other ops ignore it.
    fields = dict(dtype=torch.int8, act_dtype=dtype) if int8 else dict(dtype=dtype)
    cfg = InferenceConfig(**fields, norm_type=NormType.RMSNorm,
                          mlp_act_func_type=ActivationFuncType.GATED_SILU)
    assert cls(cfg, device="cpu").backend == "compiled"


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("op", spec.specs())
def test_compiled_kernel_matches_reference_on_spec_samples(op, suffix):
    """The resolved kernel, on the spec's own samples: a compiled function bound to the wrong kernel fails."""
    dtype, op_spec = DTYPES[suffix], spec.get(op)
    impl = dispatch.resolve(dispatch.Request(op=op, device_type="cpu", act_dtype=dtype)).impl
    samples = op_spec.samples(torch.device("cpu"), dtype, torch.Generator().manual_seed(0))
    assert samples, f"{op}'s spec has no samples"
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for args in samples:
        got, want = impl(*args), op_spec.reference(*args)
        got, want = (list(got), list(want)) if isinstance(want, (list, tuple)) else ([got], [want])
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            err = ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
            assert err <= tol, f"{op_spec.function(dtype)}: max error {err:.3g} > {tol:.1g} of max |ref|"
