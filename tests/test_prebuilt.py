"""op_builder.prebuilt: DS_BUILD_OPS at install time, and validation of installed binaries at load time.

- `plan()` as data, with an injected `compatible` (no compiler, no machine).
- A real `DS_BUILD_OPS=1 pip install --no-build-isolation --no-deps --target` of a copy of the repo,
  loaded from another directory with zero compiler invocations; a failing explicit request; a plain
  (pure-Python) install with build isolation.
- The refusal of a prebuilt binary from another torch, and the JIT fallback (tiny op).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fixtures.procs import (INFERENCE, REPO, TINY, CxxWrapper, child_env, run, run_json, snapshot_repo,
                            variant_dir)
from op_builder import InferenceBuilder, prebuilt
from op_builder.cache import BuildKey
from op_builder.compat import Decision
from op_builder.knobs import KnobError
from op_builder.prebuilt import PrebuildError, plan
from op_builder.system import ISA_RANK, Compiler, Cpu, Gpu, System

OK = Decision.of([])
NO_CUDA = Decision.of(["torch is built without CUDA (CPU-only wheel)"])
NO_TOOLCHAIN = Decision.of(["no C++ compiler found (set CXX or install g++)"])


def compat(cpu=OK, cuda=NO_CUDA, calls=None):
    def compatible(builder, variant):
        if calls is not None:
            calls.append((builder.NAME, variant))
        return {"cpu": cpu, "cuda": cuda}[variant]
    return compatible


@pytest.fixture(autouse=True)
def clean_build_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("DS_BUILD_"):
            monkeypatch.delenv(name)


def by_variant(items):
    return {i.variant: i for i in items if i.op == "transformer_inference"}


# ----------------------------------------------------------------------------------------- plan()
def test_nothing_requested(monkeypatch):
    calls = []
    items = by_variant(plan(compat(calls=calls)))
    assert not prebuilt.requested()
    assert {v: (i.build, i.why) for v, i in items.items()} == {"cpu": (False, "not requested"),
                                                                "cuda": (False, "not requested")}
    assert calls == [], "compatibility is not even asked for variants nobody requested"


def test_ds_build_ops_alone_skips_incompatible_with_why(monkeypatch):
    monkeypatch.setenv("DS_BUILD_OPS", "1")
    items = by_variant(plan(compat()))
    assert prebuilt.requested()
    assert items["cpu"].build and items["cpu"].why == "" and not items["cpu"].explicit
    assert not items["cuda"].build and not items["cuda"].explicit
    assert "torch is built without CUDA" in items["cuda"].why


def test_ds_build_ops_alone_never_fails_even_if_nothing_builds(monkeypatch):
    monkeypatch.setenv("DS_BUILD_OPS", "1")
    items = by_variant(plan(compat(cpu=NO_TOOLCHAIN)))
    assert not items["cpu"].build and "no C++ compiler" in items["cpu"].why
    assert not items["cuda"].build


def test_explicit_incompatible_variant_fails_with_reason(monkeypatch):
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE_CUDA", "1")
    with pytest.raises(PrebuildError) as info:
        plan(compat())
    message = str(info.value)
    assert "transformer_inference[cuda]" in message and "torch is built without CUDA" in message
    assert "DS_BUILD_TRANSFORMER_INFERENCE_CUDA" in message, message


def test_explicit_op_builds_what_it_can(monkeypatch):
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE", "1")
    items = by_variant(plan(compat()))
    assert items["cpu"].build and items["cpu"].explicit
    assert not items["cuda"].build and items["cuda"].explicit and "without CUDA" in items["cuda"].why


def test_explicit_op_fails_when_no_variant_can_build(monkeypatch):
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE", "1")
    with pytest.raises(PrebuildError) as info:
        plan(compat(cpu=NO_TOOLCHAIN))
    message = str(info.value)
    assert "DS_BUILD_TRANSFORMER_INFERENCE" in message
    assert "no C++ compiler" in message and "without CUDA" in message


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "False"])
def test_per_op_zero_disables(monkeypatch, value):
    monkeypatch.setenv("DS_BUILD_OPS", "1")
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE", value)
    calls = []
    items = by_variant(plan(compat(cpu=NO_TOOLCHAIN, calls=calls)))
    assert not items["cpu"].build and items["cpu"].why == "not requested"
    assert not items["cuda"].build
    assert calls == []


def test_per_variant_zero_disables_only_that_variant(monkeypatch):
    monkeypatch.setenv("DS_BUILD_OPS", "1")
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE_CUDA", "0")
    items = by_variant(plan(compat(cuda=OK)))
    assert items["cpu"].build and not items["cuda"].build and items["cuda"].why == "not requested"


def test_per_variant_wins_over_per_op(monkeypatch):
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE", "0")
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE_CPU", "1")
    items = by_variant(plan(compat()))
    assert items["cpu"].build and items["cpu"].explicit and not items["cuda"].build


@pytest.mark.parametrize("value, requested", [("1", True), ("true", True), ("yes", True), ("YES", True),
                                              ("0", False), ("false", False), ("no", False), ("", False)])
def test_boolean_spellings(monkeypatch, value, requested):
    monkeypatch.setenv("DS_BUILD_OPS", value)
    assert prebuilt.requested() is requested
    assert by_variant(plan(compat()))["cpu"].build is requested


@pytest.mark.parametrize("var", ["DS_BUILD_OPS", "DS_BUILD_TRANSFORMER_INFERENCE",
                                 "DS_BUILD_TRANSFORMER_INFERENCE_CUDA"])
def test_garbage_value_names_the_variable(monkeypatch, var):
    monkeypatch.setenv(var, "please")
    with pytest.raises(KnobError) as info:
        plan(compat())
    assert var in str(info.value) and "'please'" in str(info.value)


def test_empty_per_op_value_means_unset(monkeypatch):
    monkeypatch.setenv("DS_BUILD_OPS", "1")
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE", "")
    assert by_variant(plan(compat()))["cpu"].build


# -------------------------------------------------------------- manifest validation (fake systems)
GXX = Compiler("/usr/bin/g++", "g++:1:1")
AVX2 = Cpu("x86_64", "fake", frozenset({"avx2", "fma", "f16c"}), "fake")
OLD_CPU = Cpu("x86_64", "fake old", frozenset({"sse4_2"}), "fake")


def system(**overrides) -> System:
    fields = dict(torch_version="2.13.0+cpu", torch_cxx11_abi=True, torch_cuda=None, cpu=AVX2, cxx=GXX,
                  ninja="1.11.1", python_tag="cp311", platform="linux-x86_64")
    fields.update(overrides)
    return System.fake(**fields)


def cpu_manifest(**overrides) -> dict:
    fields = {"torch": "2.13.0+cpu", "cxx11_abi": True, "python": "cp311", "platform": "linux-x86_64"}
    manifest = {"key_fields": fields, "isa": "avx2", "native": False}
    for k, v in overrides.items():
        (fields if k in fields else manifest)[k] = v
    return manifest


def test_matching_cpu_manifest_has_no_problem():
    assert InferenceBuilder(system()).runtime_problems("cpu", cpu_manifest()) == []


def test_a_portable_binary_on_a_cpu_that_runs_more_is_noted(monkeypatch):
    """The installed CPU binary targets avx2 (portable) and is preferred over a JIT build: on an AVX-512 CPU
    the report says so, and how to get one built for it."""
    monkeypatch.delenv("DSINF_NO_PREBUILT", raising=False)
    monkeypatch.delenv("DSINF_CPU_ISA", raising=False)
    avx512 = Cpu("x86_64", "fake", frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}), "fake")
    note = InferenceBuilder(system(cpu=avx512)).prebuilt_note("cpu", cpu_manifest())
    assert note and "built for avx2" in note and "targets avx512" in note and "DSINF_NO_PREBUILT=1" in note
    assert "[K, N]" not in note  # an Intel-like brand: MKL, no GEMM of ours in either build
    amd = Cpu("x86_64", "AMD EPYC", avx512.flags, "fake")  # oneDNN's fp32 GEMM; ours on [K, N] in an AVX-512 build
    note = InferenceBuilder(system(cpu=amd)).prebuilt_note("cpu", cpu_manifest())
    assert ("float [K, N] weights to our GEMM" in note) == torch.backends.mkldnn.is_available(), note
    assert InferenceBuilder(system()).prebuilt_note("cpu", cpu_manifest()) is None
    assert InferenceBuilder(system(cpu=avx512)).prebuilt_note("cuda", {}) is None
    monkeypatch.setenv("DSINF_CPU_ISA", "avx2")  # JIT builds pinned to avx2: nothing faster to build
    assert InferenceBuilder(system(cpu=avx512)).prebuilt_note("cpu", cpu_manifest()) is None
    monkeypatch.setenv("DSINF_CPU_ISA", "auto")
    monkeypatch.setenv("DSINF_NO_PREBUILT", "1")  # already ignored
    assert InferenceBuilder(system(cpu=avx512)).prebuilt_note("cpu", cpu_manifest()) is None


@pytest.mark.parametrize("override, fragment", [
    ({"torch": "2.12.0+cpu"}, "built for torch 2.12.0+cpu, running 2.13.0+cpu"),
    ({"cxx11_abi": False}, "cxx11_abi"),
    ({"python": "cp312"}, "built for python cp312, running cp311"),
    ({"platform": "linux-aarch64"}, "platform"),
    ({"native": True}, "-march=native"),
    ({"isa": "avx512"}, "built for avx512 but this CPU supports only avx2"),
])
def test_cpu_manifest_mismatch_is_explained(override, fragment):
    problems = InferenceBuilder(system()).runtime_problems("cpu", cpu_manifest(**override))
    assert any(fragment in p for p in problems), problems


def test_portable_avx2_binary_refused_on_older_cpu():
    problems = InferenceBuilder(system(cpu=OLD_CPU)).runtime_problems("cpu", cpu_manifest())
    assert any("supports only baseline" in p for p in problems)


def cuda_manifest(archs, torch_cuda="13.0"):
    return {"key_fields": {"torch": "2.13.0+cu130", "cxx11_abi": True, "python": "cp311",
                           "platform": "linux-x86_64", "torch_cuda": torch_cuda}, "archs": archs}


@pytest.mark.parametrize("capability, ok", [((8, 0), True), ((8, 6), True), ((9, 0), True), ((12, 0), True),
                                            ((7, 5), False)])
def test_cuda_manifest_checked_against_visible_gpus(capability, ok):
    s = system(torch_version="2.13.0+cu130", torch_cuda="13.0", gpus=(Gpu(0, "gpu", capability),))
    problems = InferenceBuilder(s).runtime_problems("cuda", cuda_manifest(["8.0", "9.0a", "10.0+PTX"]))
    assert (problems == []) is ok, problems
    if not ok:
        assert "cannot run on GPU 0" in problems[0]


def test_cuda_manifest_from_other_cuda_is_refused():
    s = system(torch_version="2.13.0+cu130", torch_cuda="13.0", gpus=(Gpu(0, "gpu", (9, 0)),))
    problems = InferenceBuilder(s).runtime_problems("cuda", cuda_manifest(["9.0a"], torch_cuda="12.8"))
    assert any("built for CUDA 12.8" in p for p in problems)


# ------------------------------------------------------------------- prebuilt fallback (tiny op)
@pytest.mark.slow
def test_prebuilt_from_other_torch_is_refused_and_jit_takes_over(tmp_path):
    # an "installed" tiny op: a real build, copied where TinyBuilder looks for prebuilt binaries
    build_env = child_env(tmp_path / "build", TINY_OP_BINDING="0")
    r = run_json(TINY, build_env, timeout=300)
    assert r.rc == 0 and r.data["how"] == "built", r
    installed = tmp_path / "installed" / "tiny_test_op-cpu"
    shutil.copytree(Path(r.data["path"]).parent, installed)

    env = child_env(tmp_path / "user", TINY_OP_BINDING="0", TINY_OP_PREBUILT=str(tmp_path / "installed"),
                    TINY_OP_NO_LOGGING="1")
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env["CXX"] = str(cxx.path)
    good = run_json(TINY, env, timeout=300)
    assert good.rc == 0 and good.data["how"] == "prebuilt" and good.data["ok"], good
    assert Path(good.data["path"]).parent == installed and cxx.calls() == []
    assert not variant_dir(env).exists() or not any(variant_dir(env).iterdir())

    manifest_path = installed / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["key_fields"]["torch"] = "0.0.1+other"
    manifest["key"] = BuildKey.of(**manifest["key_fields"]).digest  # a genuine manifest of that torch
    manifest_path.write_text(json.dumps(manifest))
    refused = run_json(TINY, env, timeout=300)
    assert refused.rc == 0 and refused.data["ok"], refused
    assert refused.data["how"] == "built" and not Path(refused.data["path"]).is_relative_to(installed)
    warning = next(line for line in refused.stderr.splitlines() if "cannot be used here" in line)
    assert "tiny_test_op[cpu]" in warning and "built for torch 0.0.1+other" in warning
    assert f"running {torch.__version__}" in warning and "falling back to a JIT build" in warning
    assert cxx.compiles(), "the fallback is a real JIT build"

    # DSINF_NO_PREBUILT ignores even a valid installed binary (and now finds the JIT entry)
    manifest_path.write_text(original)
    cxx.reset()
    ignored = run_json(TINY, {**env, "DSINF_NO_PREBUILT": "1"}, timeout=300)
    assert ignored.rc == 0 and ignored.data["how"] == "cached" and cxx.calls() == [], ignored

    # a corrupted installed library is refused too (checksum), not dlopen'ed
    lib = installed / manifest["library"]
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    corrupted = run_json(TINY, env, timeout=300)
    assert corrupted.rc == 0 and corrupted.data["how"] == "cached", corrupted
    assert "checksum" in corrupted.stderr and "falling back" in corrupted.stderr


# ----------------------------------------------------------------------------- real pip installs
def source_copy(dest: Path) -> Path:
    """What pip needs, copied away from the shared working tree (pip builds in-tree: build/, egg-info)."""
    snapshot_repo(dest)
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, dest / name)
    return dest


def pip_install(src: Path, target: Path, env: dict[str, str], *isolation: str, timeout: float = 900):
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "-v", *isolation, str(src)]
    return subprocess.run(cmd, env=env, cwd=src.parent, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed_with_ops(tmp_path_factory):
    """DS_BUILD_OPS=1 pip install --no-build-isolation --no-deps --target <dir> <copy of the repo>."""
    tmp = tmp_path_factory.mktemp("ds-build-ops")
    src = source_copy(tmp / "src")
    env = child_env(tmp, pythonpath=[], DS_BUILD_OPS="1")
    start = time.monotonic()
    proc = pip_install(src, tmp / "target", env, "--no-build-isolation")
    return tmp / "target", proc, time.monotonic() - start


@pytest.mark.slow
def test_ds_build_ops_install_ships_a_validated_cpu_binary(installed_with_ops):
    target, proc, _ = installed_with_ops
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    output = proc.stdout + proc.stderr
    assert "skipping prebuilt transformer_inference[cuda]: torch is built without CUDA" in output, output[-5000:]
    directory = target / "op_builder" / "prebuilt" / "transformer_inference-cpu"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert (directory / manifest["library"]).is_file()
    assert manifest["isa"] == "avx2" and manifest["native"] is False, "prebuilt = portable baseline"
    assert "-march=native" not in manifest["key_fields"]["cflags"]
    assert manifest["key_fields"]["torch"] == torch.__version__
    assert not (target / "op_builder" / "prebuilt" / "transformer_inference-cuda").exists()
    assert (target / "op_builder" / "csrc" / "inference" / "binding" / "cpu_binding.cpp").is_file()


@pytest.mark.slow
def test_installed_binary_loads_without_the_compiler(installed_with_ops, tmp_path):
    target, proc, _ = installed_with_ops
    assert proc.returncode == 0
    elsewhere = tmp_path / "elsewhere"  # cwd is not the repo: the installed copy is what gets imported
    elsewhere.mkdir()
    env = child_env(tmp_path, pythonpath=[target])
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env["CXX"] = str(cxx.path)
    r = run_json(INFERENCE, env, cwd=elsewhere, timeout=300)
    assert r.rc == 0 and not r.data["errors"], r
    assert Path(r.data["op_builder_file"]).is_relative_to(target)
    assert r.data["how"] == "prebuilt" and Path(r.data["path"]).is_relative_to(target)
    assert r.data["vector_matmul_ok"] and r.data["linear_layer_ok"]
    assert cxx.calls() == [], f"loading a prebuilt binary ran the compiler: {cxx.calls()}"

    report = run([sys.executable, "-m", "op_builder.report", "--json"], env, cwd=elsewhere, timeout=300)
    assert report.rc == 0, report
    rows = {row["variant"]: row for row in json.loads(report.stdout)["ops"]}
    assert rows["cpu"]["installed"] is True and rows["cpu"]["installed_why_not"] is None
    # the portable (avx2) binary on a CPU that runs more: the report says so and how to get a faster one
    from op_builder.system import ISA_RANK, current_system

    here = current_system().cpu.isa
    if ISA_RANK[here] > ISA_RANK["avx2"]:
        from dsinf.builder import host_kn_gemm

        kn = (" (and takes float [K, N] weights to our GEMM, which this one leaves to oneDNN)"
              if host_kn_gemm(current_system().cpu, here) else "")
        assert rows["cpu"]["installed_note"] == (f"the installed binary is built for avx2 (portable); a JIT build "
                                                 f"here targets {here}{kn}: DSINF_NO_PREBUILT=1 builds (once) and "
                                                 f"loads one")
    else:
        assert rows["cpu"]["installed_note"] is None
    assert rows["cuda"]["installed"] is False and rows["cuda"]["buildable"] is False
    text = run([sys.executable, "-m", "op_builder.report", "--no-color"], env, cwd=elsewhere, timeout=300)
    cpu_row = text.stdout.split("transformer_inference[cpu]")[1].split("transformer_inference[cuda]")[0]
    assert cpu_row.split()[0] == "[YES]", cpu_row
    assert "DS_BUILD_TRANSFORMER_INFERENCE=1" not in cpu_row, f"advises what was done:{cpu_row}"


@pytest.mark.slow
def test_installed_binary_for_a_missing_isa_falls_back_to_jit(installed_with_ops, tmp_path):
    """A prebuilt binary records its ISA; on a CPU without that ISA it is refused with the reason (load
    warning and report) and a JIT build for this CPU runs instead."""
    target, proc, _ = installed_with_ops
    assert proc.returncode == 0
    mine = tmp_path / "target"
    shutil.copytree(target, mine)
    manifest_path = mine / "op_builder" / "prebuilt" / "transformer_inference-cpu" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    here = InferenceBuilder().system.cpu.isa
    higher = [name for name, rank in ISA_RANK.items() if rank > ISA_RANK[here]]
    # This CPU may have the best level we know: then a level from a newer dsinf, which it cannot have.
    manifest["isa"] = higher[-1] if higher else "avx10_2"
    manifest_path.write_text(json.dumps(manifest))  # isa is not a key field: the manifest stays genuine
    env = child_env(tmp_path, pythonpath=[mine])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_json(INFERENCE, env, cwd=elsewhere, timeout=600)
    assert r.rc == 0 and not r.data["errors"], r
    assert r.data["how"] == "built" and not Path(r.data["path"]).is_relative_to(mine), r.data
    assert r.data["vector_matmul_ok"] and r.data["linear_layer_ok"]
    why = f"built for {manifest['isa']} but this CPU supports only {here}"
    assert why in r.stderr and "falling back to a JIT build" in r.stderr, r.stderr[-3000:]
    report = run([sys.executable, "-m", "op_builder.report", "--json"], env, cwd=elsewhere, timeout=300)
    rows = {row["variant"]: row for row in json.loads(report.stdout)["ops"]}
    assert rows["cpu"]["installed"] is False and why in rows["cpu"]["installed_why_not"], rows["cpu"]


def wheel_tag(wheel: Path) -> str:
    return "-".join(wheel.name[:-len(".whl")].split("-")[-3:])


@pytest.mark.slow
def test_prebuilt_wheel_is_platform_tagged_and_plain_wheel_is_not(tmp_path):
    """A DS_BUILD_OPS=1 wheel holds a native library: tagged for this Python and platform, never `any`."""
    src = source_copy(tmp_path / "src")
    deleted = src / "csrc" / "inference" / "cpu" / "zz_deleted_later.cpp"
    deleted.write_text("// a kernel source the next wheel's sources no longer have\n")
    tags = {}
    for name, extra in (("prebuilt", {"DS_BUILD_OPS": "1"}), ("plain", {}),
                        ("cpu-off", {"DS_BUILD_OPS": "1", "DS_BUILD_TRANSFORMER_INFERENCE_CPU": "0"})):
        if name == "cpu-off":
            deleted.unlink()
        out = tmp_path / name
        env = child_env(tmp_path / f"env-{name}", pythonpath=[], **extra)
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                               "-w", str(out), str(src)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (wheel,) = out.glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            meta = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
        tags[name] = (wheel_tag(wheel), meta, [n for n in names if n.endswith(".so")])
        sources = [n for n in names if n.endswith(".cpp")]
        assert sources and any(n.endswith("cpu/gemv.cpp") for n in sources), sources
        assert any(n.endswith("zz_deleted_later.cpp") for n in sources) == deleted.exists(), (name, sources)
    tag, meta, libs = tags["prebuilt"]
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert tag.startswith(f"{py}-{py}-") and not tag.endswith("-any"), tag
    assert "Root-Is-Purelib: false" in meta, meta
    assert libs == ["op_builder/prebuilt/transformer_inference-cpu/transformer_inference_cpu.so"], libs
    tag, meta, libs = tags["plain"]
    assert tag == "py3-none-any" and libs == [] and "Root-Is-Purelib: true" in meta, (tag, meta)
    # the same source tree, in-tree build dir and all: the binary the first wheel built is not shipped again
    assert tags["cpu-off"][2] == [], tags["cpu-off"]


def test_ds_build_ops_with_an_editable_install_says_it_builds_nothing(tmp_path):
    """An editable install's build_py writes into a temp dir it then discards: DS_BUILD_OPS=1 used to compile
    there for nothing (20 s and up). It now says why it builds nothing, and builds nothing."""
    src = source_copy(tmp_path / "src")
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env = child_env(tmp_path / "env", pythonpath=[], DS_BUILD_OPS="1", CXX=str(cxx.path))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation",
                           "--prefix", str(tmp_path / "prefix"), "-e", str(src)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ignored by an editable install" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert cxx.compiles() == []
    assert not (src / "op_builder" / "prebuilt").exists()


@pytest.mark.slow
def test_installed_binary_from_other_torch_is_refused_with_reason(installed_with_ops, tmp_path):
    target, proc, _ = installed_with_ops
    assert proc.returncode == 0
    mine = tmp_path / "target"  # a private copy: the module's install stays intact for other tests
    shutil.copytree(target, mine)
    manifest_path = mine / "op_builder" / "prebuilt" / "transformer_inference-cpu" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["key_fields"]["torch"] = "2.0.0+other"
    manifest["key"] = BuildKey.of(**manifest["key_fields"]).digest  # a genuine manifest of that torch
    manifest_path.write_text(json.dumps(manifest))
    env = child_env(tmp_path, pythonpath=[mine])
    code = "from op_builder import InferenceBuilder; print(InferenceBuilder().prebuilt_problem('cpu'))"
    r = run([sys.executable, "-c", code], env, cwd=tmp_path, timeout=120)
    assert r.rc == 0, r
    assert f"built for torch 2.0.0+other, running {torch.__version__}" in r.stdout
    report = run([sys.executable, "-m", "op_builder.report", "--json"], env, cwd=tmp_path, timeout=300)
    rows = {row["variant"]: row for row in json.loads(report.stdout)["ops"]}
    assert rows["cpu"]["installed"] is False and "2.0.0+other" in rows["cpu"]["installed_why_not"]
    assert rows["cpu"]["buildable"] is True  # so load() falls back to JIT (proven with the tiny op above)


@pytest.mark.slow
def test_explicit_cuda_request_fails_fast_with_the_reason(tmp_path):
    src = source_copy(tmp_path / "src")
    env = child_env(tmp_path, pythonpath=[], DS_BUILD_TRANSFORMER_INFERENCE_CUDA="1")
    start = time.monotonic()
    proc = pip_install(src, tmp_path / "target", env, "--no-build-isolation", timeout=300)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "transformer_inference[cuda]" in output and "torch is built without CUDA" in output, output[-3000:]
    assert "building transformer_inference" not in output, "it must fail before compiling anything"
    assert elapsed < 240
    assert not (tmp_path / "target" / "op_builder").exists()


@pytest.mark.slow
def test_plain_install_is_pure_python_with_build_isolation(tmp_path):
    src = source_copy(tmp_path / "src")
    env = child_env(tmp_path, pythonpath=[])
    proc = pip_install(src, tmp_path / "target", env, timeout=600)  # default: build isolation
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(s in output for s in ("NewConnectionError", "Could not find a version",
                                                           "No matching distribution")):
        pytest.skip("build isolation needs setuptools from the package index, which is unreachable here")
    assert proc.returncode == 0, output[-5000:]
    target = tmp_path / "target"
    assert [str(p) for p in target.rglob("*.so")] == []
    assert not (target / "op_builder" / "prebuilt").exists()
    assert (target / "op_builder" / "csrc" / "inference" / "cpu").is_dir(), "kernel sources ship for JIT builds"
    code = ("import op_builder, dsinf, json; from op_builder import InferenceBuilder; "
            "print(json.dumps([op_builder.__file__, InferenceBuilder().prebuilt_problem('cpu')]))")
    r = run([sys.executable, "-c", code], child_env(tmp_path, pythonpath=[target]), cwd=tmp_path, timeout=120)
    assert r.rc == 0, r
    location, why = json.loads(r.stdout)
    assert Path(location).is_relative_to(target) and why == "not installed"
