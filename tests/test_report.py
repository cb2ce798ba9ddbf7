"""`python -m op_builder.report [--json] [--build]` on this machine, and on broken environments.

Each run is a fresh interpreter with private caches; the report must never traceback and must exit 0
unless `--build` finds a variant that does not build or does not match the reference.
"""
from __future__ import annotations

import json
import sys

import subprocess

import pytest
import torch

from fixtures.procs import FIXTURES, INFERENCE, child_env, cold_cpu_build, run, snapshot_repo
from op_builder.knobs import KNOBS
from op_builder.report import CPU_ONLY

REPORT = [sys.executable, "-m", "op_builder.report"]
BROKEN = {"CXX": "/nonexistent/c++", "TORCH_CUDA_ARCH_LIST": "garbage", "MAX_JOBS": "abc",
          "DS_BUILD_TIMEOUT": "-1", "DSINF_BACKEND": "bogus", "DS_BUILD_OPS": "maybe", "CUDA_HOME": "/nonexistent"}


def report(tmp_path, *args, **env_overrides):
    env = child_env(tmp_path, **env_overrides)
    r = run(REPORT + list(args), env, cwd=tmp_path, timeout=300)
    assert "Traceback" not in r.stdout + r.stderr, r
    return r


def rows_of(data):
    return {(row["op"], row["variant"]): row for row in data["ops"]}


def test_text_report(tmp_path):
    r = report(tmp_path, "--no-color", MAX_JOBS="3")
    assert r.rc == 0, r
    out = r.stdout
    knobs_section = out.split("knobs (value, source):")[1].split("ops:")[0]
    for name in KNOBS:
        line = next((line for line in knobs_section.splitlines() if line.split() and line.split()[0] == name), None)
        assert line is not None, f"knob {name} missing from the report"
        assert line.rstrip().endswith(("(env)", "(default)")), line
    assert any(line.split()[:2] == ["MAX_JOBS", "3"] and line.endswith("(env)") for line in knobs_section.splitlines())
    ops = out.split("ops:")[1]
    cpu_line = next(line for line in ops.splitlines() if "transformer_inference[cpu]" in line)
    assert cpu_line.rstrip().endswith("[OKAY]"), cpu_line
    cuda_block = ops.split("transformer_inference[cuda]")[1]
    assert cuda_block.splitlines()[0].rstrip().endswith("[NO]")
    assert "not buildable: torch is built without CUDA" in cuda_block
    assert "\033[" not in out, "no colour codes when stdout is not a terminal"


def test_json_report(tmp_path):
    r = report(tmp_path, "--json", MAX_JOBS="3")
    assert r.rc == 0, r
    data = json.loads(r.stdout)
    env = data["environment"]
    knobs = {k["name"]: k for k in env["knobs"]}
    assert set(knobs) == set(KNOBS)
    assert knobs["MAX_JOBS"]["value"] == 3 and knobs["MAX_JOBS"]["source"] == "env"
    assert knobs["DS_BUILD_TIMEOUT"]["source"] == "default"
    assert all(k["meaning"] for k in knobs.values())
    for field in ("torch", "cxx", "ninja", "cpu", "cache_root"):
        assert field in env
    cuda_fields = ("torch_cuda", "cuda_home", "nvcc", "gpus", "cuda_targets")
    if torch.version.cuda:
        assert all(field in env for field in cuda_fields) and "cuda" not in env
    else:  # CUDA details only when torch has CUDA
        assert env["cuda"] == CPU_ONLY and not any(field in env for field in cuda_fields), env
    assert env["cache_root"].startswith(str(tmp_path))
    rows = rows_of(data)
    cpu, cuda = rows[("transformer_inference", "cpu")], rows[("transformer_inference", "cuda")]
    assert cpu["buildable"] is True and cpu["reasons"] == [] and cpu["cached"] is False
    assert cpu["installed"] is False and cpu["build_var"] == "DS_BUILD_TRANSFORMER_INFERENCE"
    # Which GEMM runs bf16 past the GEMV on this host (test_routes checks the module agrees with the rule).
    from dsinf.builder import host_native_bf16_gemm
    from op_builder.system import current_system

    native = host_native_bf16_gemm(current_system().cpu)
    assert f"bf16 past the GEMV: {'torch' if native else 'the fp32 GEMM'}" in " ".join(cpu["notes"]), cpu["notes"]
    from dsinf.builder import host_onednn_fp32_gemm

    onednn = host_onednn_fp32_gemm(current_system().cpu)
    assert f"fp32 GEMM past the GEMV: {'oneDNN' if onednn else 'MKL'}" in " ".join(cpu["notes"]), cpu["notes"]
    assert cuda["buildable"] is False and any("without CUDA" in reason for reason in cuda["reasons"])
    assert data["build"] is None


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the report of a CPU-only torch")
def test_cpu_only_torch_shows_no_cuda_details(tmp_path):
    r = report(tmp_path, "--no-color")
    assert r.rc == 0, r
    environment = r.stdout.split("knobs (value, source):")[0]
    ops = r.stdout.split("ops:")[1].split("measured choices")[0]
    assert [line.split()[0] for line in environment.splitlines() if "cuda" in line.lower()] == ["cuda"], environment
    assert CPU_ONLY in environment
    for noise in ("nvcc", "cuda_home", "cuda_targets", "gpus", "12.0+PTX", "targets:"):
        assert noise not in r.stdout.replace("TORCH_CUDA_ARCH_LIST", ""), f"{noise!r} shown on a CPU-only torch"
    cuda_block = ops.split("transformer_inference[cuda]")[1].splitlines()[1:]
    assert cuda_block == ["      not buildable: torch is built without CUDA (CPU-only wheel)"], cuda_block


@pytest.mark.parametrize("fmt", ["--json", "--no-color"])
def test_closed_pipe_is_quiet(tmp_path, fmt):
    """`report --json | head`: the reader goes away before the report writes; no traceback, exit 0."""
    proc = subprocess.Popen(REPORT + [fmt], env=child_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed long before the report (which imports torch first) writes a byte
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 0, err


def test_report_lists_the_measured_choices(tmp_path):
    """Where the route tables and the Triton autotune table live and what each holds per device, read only:
    nothing measured yet on a fresh cache; then a route table of two devices and an autotune table (a
    malformed autotune entry is not counted, and the report does not repair the file)."""
    from dsinf import routes
    from dsinf.routes import Route, RouteKey
    from dsinf.triton import autotune

    data = json.loads(report(tmp_path, "--json").stdout)
    found = {m["what"]: m for m in data["measured"]}
    assert set(found) == {"routes", "triton autotune"} and all(m["tables"] == {} for m in found.values())
    root = tmp_path / "dsinf-data"
    assert found["routes"]["path"] == str(root / routes.FILENAME)
    assert "routes: " + str(root / routes.FILENAME) + ": nothing measured yet" in report(tmp_path, "--no-color").stdout

    key = RouteKey("fp16", routes.INT8_GEMM, 4096, 4096)
    routes._save("cuda|NVIDIA H200|torch=2.11.0|build=abc", [Route(key, 256, 128),
                                                                   Route(RouteKey("fp16", "int8", 4096, 4096), 16, 16)],
                 root / routes.FILENAME)
    routes._save("cpu|AMD EPYC|threads=2|torch=2.13.0|build=def", [Route(RouteKey("fp32", "kn", 8, 8), 4, 8)],
                 root / routes.FILENAME)
    table = root / "triton" / autotune.FILENAME
    table.parent.mkdir(parents=True)
    good = {"config": {"BLOCK_M": 16}, "ms": 0.01, "candidates": 3, "tuned_at": "t"}
    table.write_text(json.dumps({"format": autotune.FORMAT, "version": autotune.VERSION, "entries": {
        "matmul|NVIDIA H200|triton=3.6.0|src=1|fp16|nk|M=16|N=64|K=64": good,
        "matmul|NVIDIA H200|triton=3.6.0|src=1|fp16|nk|M=32|N=64|K=64": good,
        "matmul|NVIDIA H200|triton=3.6.0|src=1|fp16|nk|M=64|N=64|K=64": {"config": {"BLOCK_M": "x"}}}}))
    before = table.read_bytes()
    data = json.loads(report(tmp_path, "--json").stdout)
    found = {m["what"]: m for m in data["measured"]}
    assert found["routes"]["tables"] == {"cuda|NVIDIA H200|torch=2.11.0|build=abc": 2,
                                         "cpu|AMD EPYC|threads=2|torch=2.13.0|build=def": 1}
    assert found["triton autotune"]["tables"] == {"NVIDIA H200|triton=3.6.0": 2}
    assert table.read_bytes() == before
    text = report(tmp_path, "--no-color").stdout.split("measured choices")[1]
    assert "cuda|NVIDIA H200|torch=2.11.0|build=abc: 2 entries" in text and "listed by: python -m dsinf.routes" in text


def test_report_builds_nothing_without_build(tmp_path):
    """Nothing written, not even a directory (it used to create the cache and data roots), while it still
    says where builds would go."""
    before = sorted(tmp_path.rglob("*"))
    r = report(tmp_path, "--json")
    assert r.rc == 0
    assert sorted(tmp_path.rglob("*")) == before, "a plain report created " + \
        str(sorted(set(tmp_path.rglob("*")) - set(before)))
    assert json.loads(r.stdout)["environment"]["cache_root"] == str(tmp_path / "ext" / "dsinf")


@pytest.mark.parametrize("fmt", ["--json", "--no-color"])
def test_broken_environment_is_reported_not_raised(tmp_path, fmt):
    r = report(tmp_path, fmt, **BROKEN)
    assert r.rc == 0, r
    if fmt == "--json":
        data = json.loads(r.stdout)
        knobs = {k["name"]: k for k in data["environment"]["knobs"]}
        for name in ("MAX_JOBS", "DS_BUILD_TIMEOUT", "DSINF_BACKEND", "DS_BUILD_OPS"):
            assert str(knobs[name]["value"]).startswith("INVALID") and name in knobs[name]["value"], knobs[name]
        assert knobs["CXX"]["value"] == "/nonexistent/c++"
        assert data["environment"]["cxx"] is None
        if torch.version.cuda:
            assert any("'garbage'" in p for p in data["environment"]["cuda_targets"]["problems"])
        rows = rows_of(data)
        cpu = rows[("transformer_inference", "cpu")]
        assert cpu["buildable"] is False and any("C++ compiler" in reason for reason in cpu["reasons"])
        cuda = rows[("transformer_inference", "cuda")]
        assert cuda["buildable"] is False and any("'garbage'" in reason for reason in cuda["reasons"])
    else:
        assert "INVALID (MAX_JOBS='abc' is not an integer)" in r.stdout
        assert "not buildable: no C++ compiler found" in r.stdout
        assert "cannot parse CUDA arch 'garbage'" in r.stdout


def test_a_compiler_that_cannot_run_is_not_reported_buildable(tmp_path):
    """A CXX that exists but fails (a broken wrapper, a missing shared library): the build's first step,
    torch's `--version` probe, fails; the report used to say [OKAY] beside `version=?`."""
    broken = tmp_path / "bin" / "c++"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    r = report(tmp_path, "--json", CXX=str(broken))
    assert r.rc == 0, r
    cpu = rows_of(json.loads(r.stdout))[("transformer_inference", "cpu")]
    assert cpu["buildable"] is False and any("does not run" in reason and str(broken) in reason
                                             for reason in cpu["reasons"]), cpu


def test_unwritable_cache_root_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "tmpdir").mkdir()
    r = report(tmp_path, "--json", TORCH_EXTENSIONS_DIR=str(blocker / "ext"), TMPDIR=str(tmp_path / "tmpdir"))
    assert r.rc == 0, r
    data = json.loads(r.stdout)
    assert data["environment"]["cache_root"].startswith(str(tmp_path / "xdg"))  # the per-user fallback
    assert "cannot build into" in r.stderr and str(blocker / "ext") in r.stderr


def test_a_failed_build_of_the_current_sources_is_reported(tmp_path):
    """After a build of these sources failed, the plain report says so and where its log is, instead of
    "not built (built on first use)": the first use would fail the same way."""
    source = snapshot_repo(tmp_path / "src")
    header = source / "csrc" / "inference" / "binding" / "cpu_ops.h"
    header.write_text("#error planted by test_report\n" + header.read_text())
    env = child_env(tmp_path, pythonpath=[source, FIXTURES])
    failed = run(INFERENCE, env, cwd=tmp_path, timeout=600)
    assert "planted by test_report" in failed.stdout + failed.stderr, failed
    r = run(REPORT + ["--json"], env, cwd=tmp_path, timeout=300)
    assert r.rc == 0 and "Traceback" not in r.stderr, r
    cpu = rows_of(json.loads(r.stdout))[("transformer_inference", "cpu")]
    log = cpu["failed_build_log"]
    assert log and "planted by test_report" in open(log).read(), cpu
    text = run(REPORT + ["--no-color"], env, cwd=tmp_path, timeout=300).stdout
    assert f"last build failed (the same sources and flags fail again): {log}" in text, text


@pytest.mark.slow
def test_report_build_checks_the_cpu_module(tmp_path_factory):
    """--build loads (building if needed) every buildable variant and checks it against the reference.
    It reuses the cache of test_build's cold build (built once per session) to spare another build."""
    cold = cold_cpu_build(tmp_path_factory)
    assert cold.result.rc == 0, cold.result
    cold.cxx.reset()
    r = run(REPORT + ["--json", "--build"], cold.env, timeout=900)
    assert r.rc == 0, r
    assert "Traceback" not in r.stderr
    built = json.loads(r.stdout)["build"]
    assert [(b["op"], b["variant"]) for b in built] == [("transformer_inference", "cpu")], built
    (cpu,) = built
    assert cpu["ok"] is True and cpu["how"] in ("built", "cached"), cpu
    assert "match the reference" in cpu["check"] and "vector_matmul_fp32" in cpu["check"]
    assert cpu["how"] != "cached" or cold.cxx.compiles() == []  # (the report itself runs `c++ --version`)


def test_cpu_pages_says_what_torch_s_cpu_tensors_get(tmp_path, monkeypatch):
    """The cpu_pages line: Linux's transparent huge page mode (read from its file) and torch's
    THP_MEM_ALLOC_ENABLE decide whether torch's CPU tensors get 2 MiB pages; elsewhere 4 KiB, said so."""
    from op_builder import report as rep

    mode = tmp_path / "enabled"
    monkeypatch.setattr(rep, "THP_ENABLED", str(mode))
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    mode.write_text("always [madvise] never\n")
    assert rep.cpu_pages().startswith("4 KiB (transparent huge pages: madvise, and torch advises them only with "
                                      "THP_MEM_ALLOC_ENABLE=1")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert rep.cpu_pages() == ("2 MiB for tensors of 2 MiB and more (transparent huge pages: madvise, "
                               "THP_MEM_ALLOC_ENABLE=1)")
    mode.write_text("always madvise [never]\n")
    assert rep.cpu_pages() == "4 KiB (transparent huge pages: never)"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    mode.write_text("[always] madvise never\n")
    assert rep.cpu_pages() == "2 MiB for tensors of 2 MiB and more (transparent huge pages: always)"
    mode.unlink()
    assert rep.cpu_pages() == "4 KiB (no transparent huge pages here)"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "yes")  # torch reads 1 or 0: anything else is named, not guessed
    mode.write_text("always [madvise] never\n")
    with pytest.raises(Exception, match="THP_MEM_ALLOC_ENABLE='yes'"):
        rep.cpu_pages()
    assert rep._guard(rep.cpu_pages).startswith("error: KnobError")  # the report shows it and goes on
