"""`import dsinf` is cheap: no triton, no cpuinfo, no CUDA init, no op_builder machinery, no builds.

Each check runs in a fresh interpreter (this process has imported everything already). Timing is
only a generous sanity bound; the real assertions are about which modules got imported and which
files got written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Constructing an op reads its knobs through op_builder.knobs, which imports the op_builder package (cheap:
# it probes nothing at import). What must not appear before a first call: triton, cpuinfo, and torch's
# cpp_extension (setuptools), which only a build needs.
HEAVY = ("triton", "cpuinfo", "dsinf.triton", "torch.utils.cpp_extension", "setuptools")


def run_fresh(code: str, tmp_path: Path) -> dict:
    """Run `code` (which must set `result`) in a new interpreter with empty cache dirs; return result."""
    env = dict(os.environ)
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               DSINF_CACHE_DIR=str(tmp_path / "dsinf"), PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("DSINF_BACKEND", None)
    script = "import json, sys, time\n" + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def written_files(tmp_path: Path) -> list[str]:
    return [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]


def test_import_dsinf_is_cheap(tmp_path):
    result = run_fresh("""
        t0 = time.perf_counter()
        import torch
        t1 = time.perf_counter()
        import dsinf
        t2 = time.perf_counter()
        result = {"modules": sorted(sys.modules), "torch_s": t1 - t0, "dsinf_s": t2 - t1,
                  "cuda_initialized": torch.cuda.is_initialized()}
    """, tmp_path)
    modules = set(result["modules"])
    assert not {m for m in modules if m.split(".")[0] in ("triton", "cpuinfo", "op_builder")}
    assert not {m for m in modules if m.startswith("dsinf.")}, "import dsinf should import no submodule"
    assert not result["cuda_initialized"]
    assert result["dsinf_s"] < 1.0, f"import dsinf took {result['dsinf_s']:.2f} s on top of torch"
    assert written_files(tmp_path) == []


def test_config_and_op_construction_stay_cheap(tmp_path):
    # Building configs, quantizing and constructing ops (without a device) probes nothing and builds nothing.
    result = run_fresh("""
        import torch, dsinf
        cfg = dsinf.InferenceConfig(dtype=torch.bfloat16, use_triton=True, triton_autotune=True, layer_id=0,
                                    hidden_size=64)
        ops = [dsinf.LinearOp(cfg), dsinf.VectorMatMulOp(cfg)]
        q = dsinf.quantize_int8(torch.randn(8, 4), groups=2)
        result = {"modules": sorted(sys.modules), "cuda_initialized": torch.cuda.is_initialized()}
    """, tmp_path)
    modules = set(result["modules"])
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert not result["cuda_initialized"]
    assert written_files(tmp_path) == []


def test_forced_torch_backend_builds_nothing(tmp_path):
    result = run_fresh("""
        import os
        os.environ["DSINF_BACKEND"] = "torch"
        import torch, dsinf
        op = dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32))
        out = op(torch.randn(1, 2, 4), torch.randn(4, 3))
        result = {"modules": sorted(sys.modules), "backend": op.backend}
    """, tmp_path)
    assert result["backend"] == "torch"
    assert not set(result["modules"]) & {"triton", "cpuinfo", "dsinf.triton", "torch.utils.cpp_extension"}
    assert written_files(tmp_path) == []


def test_public_names_resolve():
    import dsinf

    for name in dsinf.__all__:
        assert getattr(dsinf, name) is not None, name
    assert set(dsinf.__all__) <= set(dir(dsinf))
    assert dsinf.DeepSpeedInferenceConfig is dsinf.InferenceConfig
    assert dsinf.reference.linear_layer and dsinf.reference.vector_matmul
    assert issubclass(dsinf.InputError, ValueError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dsinf.nope  # noqa: B018
