"""`import op_builder` does no work: no torch, triton or cpuinfo import, no subprocess, no probe, no file.

op_builder is generic and imports nothing from dsinf; `from op_builder import InferenceBuilder` loads the
builder from its registry entry ("dsinf.builder:InferenceBuilder"), which is light too (no torch).

Checked in a fresh interpreter (this one has imported everything already). Spawned processes are seen
through a `sys.addaudithook` hook (subprocess.Popen, os.system, os.posix_spawn, os.exec*, os.fork), which
observes without patching anything.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from fixtures.procs import child_env

CODE = textwrap.dedent("""
    import json, sys
    spawned = []
    def hook(event, args):
        if event in ("subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.fork", "os.forkpty",
                     "os.spawn", "ctypes.dlopen"):
            spawned.append(event + " " + repr(args)[:200])
    sys.addaudithook(hook)
    before = set(sys.modules)

    import op_builder
    after_import = sorted(set(sys.modules) - before)
    from op_builder import ALL_OPS, InferenceBuilder, get_builder
    builder = InferenceBuilder()          # constructing a builder probes nothing either
    get_builder("transformer_inference")

    from op_builder import system
    result = {
        "new_modules": sorted(set(sys.modules) - before),
        "after_import": after_import,
        "spawned": spawned,
        "current_system": system._current is not None,
        "registry_probed": [name for name, b in ALL_OPS.items() if b._system is not None],
    }
    print(json.dumps(result))
""")

HEAVY = ("torch", "triton", "cpuinfo", "numpy", "setuptools", "ninja")
# What the registry entry of InferenceBuilder may import of dsinf: the package (which imports nothing itself)
# and the builder module.
DSINF_FOR_BUILDER = ["dsinf", "dsinf.builder"]


def run_import(tmp_path) -> dict:
    env = child_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_op_builder_does_no_work(tmp_path):
    result = run_import(tmp_path)
    heavy = [m for m in result["new_modules"] if m.split(".")[0] in HEAVY]
    assert heavy == [], f"import op_builder imported {heavy}"
    assert [m for m in result["after_import"] if m.split(".")[0] == "dsinf"] == [], "import op_builder imported dsinf"
    assert [m for m in result["new_modules"] if m.split(".")[0] == "dsinf"] == DSINF_FOR_BUILDER
    assert result["spawned"] == [], f"import op_builder spawned {result['spawned']}"
    assert result["current_system"] is False, "the process-wide System must not exist before first use"
    assert result["registry_probed"] == []


def test_import_op_builder_writes_nothing(tmp_path):
    run_import(tmp_path)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == [], f"import op_builder created {written}"
