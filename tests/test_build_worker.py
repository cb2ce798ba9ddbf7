"""The build worker starts ninja first and imports torch while the compilers run; the parent writes the
build.ninja that torch.utils.cpp_extension.load would write. Real builds, real ninja, a real compiler.

The tiny test op is built with a `CXX` wrapper that, when a compile starts, reads from outside how much CPU
time its build worker (the ancestor running op_builder._build_worker) has used so far. Had the worker
imported torch before starting ninja, that would be at least what `import torch` costs (a second or more);
started beside ninja, the import has barely begun when ninja's first compile starts. The compile is then
held at a gate (fixtures/procs.CxxWrapper): with it still held, the import must finish (it runs beside the
compile, not after it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils.cpp_extension as ce

from fixtures.procs import TINY, Child, CxxWrapper, child_env, variant_dir, wait_until
from fixtures.tiny_op.builder import TinyBuilder
from op_builder.archs import parse_arch_list
from op_builder.build import write_ninja_file
from op_builder.system import current_system

BUILD_TIMEOUT = 300  # seconds for a tiny build on a very busy box
PHASE = re.compile(r"^# phase +([0-9.]+) s: (.+)$", re.M)


def _phases(log: str) -> dict[str, float]:
    return {what: float(seconds) for seconds, what in PHASE.findall(log)}


def _building_log(vdir: Path) -> Path:
    (log,) = [p / "build.log" for p in vdir.iterdir() if p.name.startswith(".tmp-")]
    return log


def _worker_cpu_probe(directory: Path, cxx: CxxWrapper) -> tuple[Path, Path]:
    """A CXX that records, as each compile starts, the CPU time (utime + stime, clock ticks) its build
    worker has used, then runs `cxx` (which holds the compile at the gate)."""
    path, record = directory / "worker-cpu-probe", directory / "worker-cpu-at-compile"
    path.write_text(f"""#!/bin/sh
pid=$$
while [ "$pid" -gt 1 ]; do
  if grep -q _build_worker /proc/$pid/cmdline 2>/dev/null; then
    cut -d' ' -f14,15 /proc/$pid/stat >> '{record}'
    break
  fi
  pid=$(cut -d' ' -f4 /proc/$pid/stat)
done
exec '{cxx.path}' "$@"
""")
    path.chmod(0o755)
    return path, record


def _import_torch_cpu_seconds() -> float:
    """CPU seconds a fresh process spends in `import torch`."""
    def cpu_after(imports: str) -> float:
        code = f"import resource{imports}; u = resource.getrusage(resource.RUSAGE_SELF); print(u.ru_utime + u.ru_stime)"
        return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    return cpu_after(", torch") - cpu_after("")


def test_ninja_compiles_while_the_worker_imports_torch(tmp_path):
    env = child_env(tmp_path, TINY_OP_BINDING="0")
    cxx = CxxWrapper.create(tmp_path / "cxx")
    probe, record = _worker_cpu_probe(tmp_path / "cxx", cxx)
    env["CXX"] = str(probe)
    vdir = variant_dir(env)
    cxx.hold()
    try:
        with Child(TINY, env, tmp_path / "logs", "build") as child:
            wait_until(lambda: cxx.compiles(), BUILD_TIMEOUT, "the first compile", alive=child)
            (ticks,) = record.read_text().splitlines()
            worker_cpu = sum(map(int, ticks.split())) / os.sysconf("SC_CLK_TCK")
            import_cpu = _import_torch_cpu_seconds()
            assert worker_cpu < import_cpu / 2, (
                f"the build worker had used {worker_cpu:.2f} s of CPU when ninja's first compile started: it "
                f"imported torch ({import_cpu:.2f} s of CPU) before it started ninja")
            assert "ninja started" in _phases(_building_log(vdir).read_text())
            # the compile is still held: the import goes on beside it and finishes
            wait_until(lambda: "torch imported" in _phases(_building_log(vdir).read_text()), BUILD_TIMEOUT,
                       "the worker's torch import while the compile is held", alive=child)
            assert not list(vdir.glob(".tmp-*/*.o")), "the compile was held throughout"
            cxx.release()
            result = child.wait(BUILD_TIMEOUT)
    finally:
        cxx.release()
    assert result.rc == 0 and result.data["how"] == "built", result
    log = (Path(result.data["path"]).parent / "build.log").read_text()
    phases = _phases(log)
    order = ["ninja started", "torch imported", "ninja finished", "library loaded, kernels checked"]
    assert list(phases) == order, log
    assert [phases[p] for p in order] == sorted(phases[p] for p in order), log
    assert re.search(r"^# +[0-9.]+ s  tiny_kernel\.o$", log, re.M), "the per-TU compile-time table"
    assert "while ninja compiled" in log.splitlines()[-1], log


def _torch_writes(spec, build_dir: Path, monkeypatch) -> str:
    """The build.ninja torch.utils.cpp_extension's load path writes for `spec`: its own function, with the
    ninja run it ends with left out (the file is what is compared; the test above runs ninja for real)."""
    monkeypatch.setattr(ce, "_run_ninja_build", lambda *args, **kwargs: None)
    ce._write_ninja_file_and_build_library(
        name=spec.library_name, sources=list(spec.sources), extra_cflags=list(spec.cflags),
        extra_cuda_cflags=list(spec.cuda_cflags), extra_sycl_cflags=[], extra_ldflags=list(spec.ldflags),
        extra_include_paths=list(spec.include_dirs), build_directory=str(build_dir), verbose=False,
        with_cuda=spec.with_cuda, with_sycl=False)
    return (build_dir / "build.ninja").read_text()


def _specs():
    yield "tiny", lambda: TinyBuilder(binding=True).spec("cpu")
    from dsinf.builder import InferenceBuilder

    yield "inference-cpu", lambda: InferenceBuilder().spec("cpu")
    yield "inference-cuda", lambda: InferenceBuilder().spec("cuda", archs=parse_arch_list("9.0a"))


@pytest.mark.parametrize("make_spec", [m for _, m in _specs()], ids=[i for i, _ in _specs()])
def test_the_parent_writes_the_ninja_file_cpp_extension_load_would(make_spec, tmp_path, monkeypatch):
    spec = make_spec()
    if spec.with_cuda and ce.CUDA_HOME is None:  # a CPU torch: point both writers at the toolkit nvcc is in
        nvcc = current_system().nvcc
        if nvcc is None:
            pytest.skip("no nvcc: no CUDA toolkit to write a CUDA ninja file for")
        monkeypatch.setattr(ce, "CUDA_HOME", str(Path(nvcc.path).resolve().parents[1]))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    assert write_ninja_file(spec, ours) == ours / "build.ninja"
    assert (ours / "build.ninja").read_text() == _torch_writes(spec, theirs, monkeypatch)


@pytest.mark.parametrize("parent_alive", [True, False])
def test_a_worker_whose_parent_is_gone_starts_nothing(tmp_path, parent_alive):
    """The worker asks for SIGTERM on its parent's death itself (so the parent can start it with vfork), then
    checks that the parent it was started by is still its parent: one that died in between would never send
    that signal, so the worker must not start ninja. The build.ninja here only touches a marker file."""
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    marker = build_dir / "ran"
    (build_dir / "build.ninja").write_text(f"rule touch\n  command = touch {marker}\nbuild {marker}: touch\n")
    if parent_alive:
        parent_pid = os.getpid()
    else:  # a pid that no longer runs: a process started and reaped
        gone = subprocess.Popen(["true"])
        gone.wait()
        parent_pid = gone.pid
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"build_dir": str(build_dir), "jobs": 1, "nice": 0, "parent_pid": parent_pid,
                                "library_name": "none", "kernels": [], "dispatch_key": "CPU"}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    r = subprocess.run([sys.executable, "-m", "op_builder._build_worker", str(spec)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 1, r.stdout + r.stderr  # no library either way
    assert marker.exists() == parent_alive, r.stdout + r.stderr
