"""The sdist is complete: built from a copy of the checkout, installed non-editable (no checkout on the
path), it JIT-builds the CPU module from the sources it shipped and runs an op against the reference,
from a directory outside the repo. (`.ci/run` does the same in a fresh virtualenv.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fixtures.procs import REPO, child_env, run_json

IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "prebuilt", "*.so",
                                ".pytest_cache", ".hypothesis")

CHILD = r"""
import json, torch, dsinf, op_builder
from pathlib import Path
from dsinf import reference
from op_builder.builder import csrc_root, loaded_variants
x = torch.randn(2, 3, 45)
w = torch.randn(45, 19)
op = dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32))
out = op(x, w)
(loaded,) = loaded_variants().values()
print(json.dumps({"op_builder": op_builder.__file__, "csrc": str(csrc_root()), "backend": op.backend,
                  "how": loaded.how, "ok": bool(torch.allclose(out, reference.vector_matmul(x, w), atol=1e-4,
                                                                rtol=1e-4))}))
"""


def pip(*args: str, env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_sdist_installs_and_builds_from_its_own_sources(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    env = child_env(tmp_path, pythonpath=[])
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], env=env,
                          cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("dsinf-*.tar.gz")
    with tarfile.open(sdist) as tar:
        shipped = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    binding = "csrc/inference/binding/"
    for needed in (binding + "cpu_binding.cpp", binding + "cpu_binding_ops.cpp", binding + "cpu_ops.h",
                   binding + "op_entries.inc", binding + "op_rules.h", "csrc/inference/cpu/gemv.cpp",
                   "csrc/inference/cuda/gemv_mma.cu",
                   "csrc/inference/include/cpu_kernels.h", "README.md"):
        assert needed in shipped, f"{needed} missing from the sdist"

    target = tmp_path / "site"
    pip("install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(sdist), env=env, cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = run_json([sys.executable, "-c", CHILD], child_env(tmp_path, pythonpath=[target]), cwd=outside, timeout=900)
    assert r.rc == 0, r
    assert Path(r.data["op_builder"]).is_relative_to(target), r.data
    assert Path(r.data["csrc"]) == target / "op_builder" / "csrc", "the JIT build uses the installed sources"
    assert r.data["backend"] == "compiled" and r.data["how"] == "built" and r.data["ok"], r.data
