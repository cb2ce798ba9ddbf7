"""The GPU probe through NVML (op_builder/nvml.py): CUDA_VISIBLE_DEVICES mapped only where certain, and on
a GPU machine the same GPUs as torch's own query, found without initialising CUDA - also by a warm load.

The GPU tests run in child processes: this one initialised CUDA when conftest asked whether a GPU is there."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from op_builder import nvml
from op_builder.nvml import NvmlGpu, order_is_certain, parse_visible

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UUIDS = ["GPU-aaaa1111-0000", "GPU-aaaa2222-0000", "GPU-bbbb3333-0000"]
H100, A100 = NvmlGpu("NVIDIA H100", (9, 0), "GPU-1"), NvmlGpu("NVIDIA A100", (8, 0), "GPU-2")


@pytest.mark.parametrize("value, want", [
    (None, [0, 1, 2]),               # unset: every GPU
    ("0", [0]),
    ("2,0", [2, 0]),                 # CUDA numbers them in the listed order
    (" 1 , 2 ", [1, 2]),
    ("GPU-bbbb", [2]),               # a unique UUID prefix
    ("GPU-aaaa2222-0000,0", [1, 0]),
])
def test_visible_devices_that_map_with_certainty(value, want):
    assert parse_visible(value, UUIDS) == want


@pytest.mark.parametrize("value", [
    "",            # no GPU at all: torch says so
    "3",           # out of range: CUDA stops there
    "-1",          # the usual way to hide every GPU
    "0,0",         # repeated
    "GPU-aaaa",    # a prefix of two UUIDs
    "GPU-cccc",    # no such GPU
    "MIG-1234",    # MIG instances are CUDA's to enumerate
    "0,,1",
    "zero",
])
def test_visible_devices_left_to_torch(value):
    assert parse_visible(value, UUIDS) is None


def test_order_is_certain_only_where_nvml_order_is_cudas():
    alike = [H100, NvmlGpu("NVIDIA H100", (9, 0), "GPU-3")]
    assert order_is_certain(alike, None, None)
    mixed = [A100, H100]  # CUDA's default numbers the H100 first; NVML, in bus order, the A100
    assert not order_is_certain(mixed, None, None)
    assert not order_is_certain(mixed, "0", None)  # index 0 is the H100 to CUDA
    assert order_is_certain(mixed, "0", "PCI_BUS_ID")
    assert not order_is_certain(mixed, "0", "FASTEST_FIRST")  # CUDA's default, spelt out
    assert order_is_certain(mixed, "GPU-2,GPU-1", None)  # UUIDs name the GPUs whatever the order
    assert not order_is_certain(mixed, "GPU-2,0", None)


def test_without_nvml_the_probe_defers(monkeypatch):
    monkeypatch.setattr(nvml, "_load", lambda: None)
    assert nvml.visible_gpus("13.0", None, None) is None


# ---- on a GPU machine -------------------------------------------------------------------------------------
_CHILD = """
import json, sys
import torch
from op_builder.system import current_system
gpus, via = current_system().gpu_probe
cuda_after_probe = torch.cuda.is_initialized()
if sys.argv[1] == "load":
    from op_builder import InferenceBuilder
    InferenceBuilder().load("cuda")
cuda_after_load = torch.cuda.is_initialized()
forked_child_ok = None
if sys.argv[1] == "fork":  # a forked child uses the GPU: it could not, had the parent initialised CUDA
    import os
    from op_builder import InferenceBuilder
    InferenceBuilder().load("cuda")
    cuda_after_load = torch.cuda.is_initialized()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            x = torch.randn(1, 3, 64, device="cuda", dtype=torch.float16)
            w = torch.randn(64, 40, device="cuda", dtype=torch.float16)
            got = torch.ops.dsinf.vector_matmul_fp16(x, w, False, None, False, False)
            want = x.float() @ w.float()  # [K, N] weight (transposed_mode False)
            code = 0 if torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2) else 2
        finally:
            os._exit(code)
    forked_child_ok = os.waitpid(pid, 0)[1] == 0
torch_view = [[torch.cuda.get_device_name(i), list(torch.cuda.get_device_capability(i))]
              for i in range(torch.cuda.device_count())]
print("RESULT " + json.dumps({"via": via, "gpus": [[g.name, list(g.capability)] for g in gpus]
                              if isinstance(gpus, tuple) else gpus, "torch": torch_view,
                              "cuda_after_probe": cuda_after_probe, "cuda_after_load": cuda_after_load,
                              "forked_child_ok": forked_child_ok}))
"""


def _child(mode: str, **env: str) -> dict:
    p = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.gpu
def test_nvml_finds_torchs_gpus_without_initialising_cuda():
    r = _child("probe")
    assert r["via"] == "nvml"
    assert r["gpus"] == r["torch"] and r["gpus"]
    assert not r["cuda_after_probe"]


@pytest.mark.gpu
def test_visible_devices_by_uuid_and_index():
    import torch

    uuid = str(torch.cuda.get_device_properties(0).uuid)
    for value in ("0", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"):
        r = _child("probe", CUDA_VISIBLE_DEVICES=value)
        assert (r["via"], len(r["gpus"]), r["gpus"] == r["torch"]) == ("nvml", 1, True), value
    r = _child("probe", CUDA_VISIBLE_DEVICES="-1")  # not NVML's to map: torch answers
    assert r["via"] == "torch" and isinstance(r["gpus"], str)


@pytest.mark.gpu
def test_a_load_leaves_cuda_uninitialised():
    """The cache key needs the GPUs' capabilities; a load that asked torch for them initialised CUDA
    (0.2 s of a warm load, and a fork()ed child could no longer use the GPU)."""
    r = _child("load")
    assert r["via"] == "nvml"
    assert not r["cuda_after_load"]


@pytest.mark.gpu
def test_a_child_forked_after_a_load_runs_on_the_gpu():
    r = _child("fork")
    assert not r["cuda_after_load"]
    assert r["forked_child_ok"]
