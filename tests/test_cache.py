"""op_builder.cache: the cache root, the build key (what makes two builds different), manifests, and
which entries a loader may trust. No compiler runs here: keys and manifests are pure functions of
files and fields (the builds themselves are in test_build.py)."""
from __future__ import annotations

import json
import logging
import os
import stat
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fixtures.procs import FIXTURES, REPO
from fixtures.tiny_op.builder import HERE as TINY_SRC
from fixtures.tiny_op.builder import TinyBuilder
from op_builder import InferenceBuilder, cache, trust
from op_builder.cache import BuildKey, entry_problem, read_manifest, source_closure, write_manifest
from op_builder.system import Compiler, Cpu, System

GXX = Compiler("/usr/bin/g++", "/usr/bin/g++-12:1305592:1700000000")
AVX2 = Cpu("x86_64", "fake EPYC", frozenset({"avx2", "fma", "f16c"}), "fake")
AVX512 = Cpu("x86_64", "fake EPYC", frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}), "fake")


def fake_system(**overrides) -> System:
    fields = dict(torch_version="2.13.0+cpu", torch_cxx11_abi=True, ninja="1.11.1", cxx=GXX, cpu=AVX2)
    fields.update(overrides)
    return System.fake(**fields)


@pytest.fixture
def src(tmp_path) -> Path:
    """A private copy of the tiny op's sources, free to edit."""
    dest = tmp_path / "src"
    shutil.copytree(TINY_SRC, dest, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dest


def tiny_key(src: Path, system: System | None = None, cflags=(), binding=True) -> str:
    builder = TinyBuilder(system or fake_system(), src_dir=src, cflags=tuple(cflags), binding=binding)
    return builder.key("cpu", builder.spec("cpu")).digest


# ----------------------------------------------------------------------------------- key sensitivity
def test_same_inputs_same_key(src):
    assert tiny_key(src) == tiny_key(src)
    assert tiny_key(src, fake_system()) == tiny_key(src, fake_system())


def test_same_key_in_another_process(src):
    """The digest is stable across interpreters (no hash randomisation, no dict-order dependence)."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from op_builder.system import Compiler, Cpu, System
        from tiny_op.builder import TinyBuilder
        s = System.fake(torch_version="2.13.0+cpu", torch_cxx11_abi=True, ninja="1.11.1",
                        cxx=Compiler({GXX.path!r}, {GXX.identity!r}),
                        cpu=Cpu("x86_64", "fake EPYC", frozenset({{"avx2", "fma", "f16c"}}), "fake"))
        b = TinyBuilder(s, src_dir=Path({str(src)!r}), cflags=(), binding=True)
        print(b.key("cpu", b.spec("cpu")).digest)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(FIXTURES)]), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == tiny_key(src)


def test_source_byte_changes_key(src):
    before = tiny_key(src)
    path = src / "tiny_kernel.cpp"
    path.write_bytes(path.read_bytes().replace(b"x[i] * s", b"x[i]  * s"))  # whitespace only
    assert tiny_key(src) != before


def test_included_header_changes_key(src):
    before = tiny_key(src)
    header = src / "tiny_kernel.h"
    header.write_text(header.read_text().replace("#define TINY_OFFSET 0.0f", "#define TINY_OFFSET 1.0f"))
    assert tiny_key(src) != before


def test_transitively_included_header_changes_key(src):
    (src / "deep.h").write_text("#pragma once\n#define DEEP 1\n")
    header = src / "tiny_kernel.h"
    header.write_text(header.read_text().replace("#include <stdint.h>", '#include <stdint.h>\n#include "deep.h"'))
    before = tiny_key(src)
    (src / "deep.h").write_text("#pragma once\n#define DEEP 2\n")
    assert tiny_key(src) != before


def test_header_nobody_includes_does_not_change_key(src):
    (src / "unused.h").write_text("#define UNUSED 1\n")
    before = tiny_key(src)
    (src / "unused.h").write_text("#define UNUSED 2\n")
    assert tiny_key(src) == before


def test_flag_changes_key(src):
    assert tiny_key(src, cflags=["-DEXTRA=1"]) != tiny_key(src)
    assert tiny_key(src, cflags=["-DEXTRA=1"]) != tiny_key(src, cflags=["-DEXTRA=2"])


def test_source_list_changes_key(src):
    assert tiny_key(src, binding=False) != tiny_key(src, binding=True)


def test_required_kernels_change_key(src, monkeypatch):
    """Two package versions over the same sources that require different kernels of the library would
    reject and rebuild each other's entry in turn under one key."""
    before = tiny_key(src)
    monkeypatch.setenv("TINY_OP_KERNELS", "dsinf_test_tiny::scale,dsinf_test_tiny::other")
    assert tiny_key(src) != before


@pytest.mark.parametrize("field, value", [
    ("torch_version", "2.12.0+cpu"),
    ("torch_cxx11_abi", False),
    ("python_tag", "cp312"),
    ("platform", "linux-aarch64"),
    ("cxx", Compiler("/usr/bin/g++", "/usr/bin/g++-13:1400000:1700000001")),
])
def test_toolchain_and_runtime_fields_change_key(src, field, value):
    assert tiny_key(src, fake_system(**{field: value})) != tiny_key(src)


def test_builder_version_changes_key(src, monkeypatch):
    before = tiny_key(src)
    monkeypatch.setattr(cache, "BUILDER_VERSION", "test-bump")
    assert tiny_key(src) != before


def inference_cpu_key(system: System) -> str:
    builder = InferenceBuilder(system)
    return builder.key("cpu", builder.spec("cpu")).digest


def test_native_build_key_is_tied_to_the_cpu_model(monkeypatch):
    monkeypatch.delenv("DSINF_NATIVE_ISA", raising=False)  # default: -march=native
    other_model = Cpu("x86_64", "fake EPYC (other model)", AVX2.flags, "fake")
    assert inference_cpu_key(fake_system(cpu=AVX2)) != inference_cpu_key(fake_system(cpu=other_model))


def test_isa_field_recorded_in_key_fields(monkeypatch):
    monkeypatch.setenv("DSINF_NATIVE_ISA", "0")
    builder = InferenceBuilder(fake_system(cpu=AVX512))
    fields = builder.key("cpu", builder.spec("cpu")).as_dict()
    assert fields["isa"] == "avx512" and fields["torch"] == "2.13.0+cpu" and fields["builder"] == cache.BUILDER_VERSION
    assert fields["cxx"] == GXX.identity


def test_build_key_is_order_independent():
    assert BuildKey.of(a=1, b=[1, 2]).digest == BuildKey.of(b=[1, 2], a=1).digest
    assert BuildKey.of(a=1).digest != BuildKey.of(a=2).digest
    assert BuildKey.of(a=[1, 2]).digest != BuildKey.of(a=[2, 1]).digest  # flag order matters to a compiler
    key = BuildKey.of(torch="2.13.0", flags=["-O3"], abi=True, none=None)
    assert key.as_dict() == {"torch": "2.13.0", "flags": ["-O3"], "abi": True, "none": None}
    assert len(key.digest) == 20 and all(c in "0123456789abcdef" for c in key.digest)


def test_source_closure_follows_quoted_includes(src):
    files = source_closure([src / "tiny_binding.cpp"], [src])
    assert {p.name for p in files} == {"tiny_binding.cpp", "tiny_kernel.h"}


def test_angle_bracket_includes_found_in_the_include_dirs_are_in_the_key(src):
    """`#include <tiny_kernel.h>` reaches the project's header through -I: its edits change the binary, so
    they must change the key (only quoted includes used to count: the old binary was reused)."""
    kernel = src / "tiny_kernel.cpp"
    kernel.write_text(kernel.read_text().replace('#include "tiny_kernel.h"', "#include <tiny_kernel.h>"))
    assert {p.name for p in source_closure([kernel], [src])} == {"tiny_kernel.cpp", "tiny_kernel.h"}
    assert {p.name for p in source_closure([kernel], [])} == {"tiny_kernel.cpp"}  # <...>: not the file's own dir
    before = tiny_key(src, binding=False)
    header = src / "tiny_kernel.h"
    header.write_text(header.read_text().replace("#define TINY_OFFSET 0.0f", "#define TINY_OFFSET 1.0f"))
    assert tiny_key(src, binding=False) != before


def inference_cuda_key(system: System) -> str:
    from op_builder.archs import parse_arch_list

    builder = InferenceBuilder(system)
    return builder.key("cuda", builder.spec("cuda", archs=parse_arch_list("9.0a"))).digest


def test_the_cuda_key_holds_the_nvcc_host_compiler_and_nvcc_flags_that_run(tmp_path, monkeypatch):
    """torch writes PYTORCH_NVCC (else the toolkit's nvcc) into build.ninja and passes CC as -ccbin; nvcc adds
    NVCC_PREPEND_FLAGS / NVCC_APPEND_FLAGS to every command. Each changes the binary, so each is in the key
    (the key used to hold only `nvcc --version`)."""
    from op_builder.system import Nvcc, _probe_cuda_toolchain

    nvcc = Nvcc("/usr/bin/true", (13, 0), ((9, 0),))
    for name in ("CC", "PYTORCH_NVCC", "NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    tool = tmp_path / "bin" / "cc-wrapper"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\nexec gcc \"$@\"\n")
    tool.chmod(0o755)
    base = _probe_cuda_toolchain(nvcc)
    for name, value in (("CC", str(tool)), ("NVCC_CCBIN", str(tool)), ("PYTORCH_NVCC", f"{tool} --x"),
                        ("NVCC_PREPEND_FLAGS", "-DX=1"), ("NVCC_APPEND_FLAGS", "-DX=2")):
        monkeypatch.setenv(name, value)
        assert _probe_cuda_toolchain(nvcc) != base, name
        monkeypatch.delenv(name)
    assert _probe_cuda_toolchain(nvcc) == base
    tool.write_text(tool.read_text() + "# upgraded\n")  # the same path, another program: another identity
    monkeypatch.setenv("CC", str(tool))
    assert str(tool) in _probe_cuda_toolchain(nvcc)["host"]
    fields = dict(torch_cuda="13.0", nvcc=nvcc)
    assert inference_cuda_key(fake_system(**fields, cuda_toolchain=base)) != \
        inference_cuda_key(fake_system(**fields, cuda_toolchain={**base, "host": "/opt/clang:1:2"}))


def test_real_inference_sources_include_their_headers():
    builder = InferenceBuilder(fake_system())
    spec = builder.spec("cpu")
    files = {p.name for p in source_closure([Path(s) for s in spec.sources], [Path(i) for i in spec.include_dirs])}
    assert {"cpu_kernels.h", "validate.h", "cpu_simd.h", "cpu_ops.h", "op_entries.inc", "op_rules.h",
            "cpu_binding.cpp", "cpu_binding_ops.cpp"} <= files


# --------------------------------------------------------------------------------------------- root
def test_cache_root_honours_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert cache.cache_root() == tmp_path / "ext" / "dsinf"
    assert (tmp_path / "ext" / "dsinf").is_dir()


def test_data_tables_stay_out_of_a_shared_torch_extensions_dir(tmp_path, monkeypatch):
    """The route and autotune tables go beside the cache root only where that dir is ours alone; in a shared
    sticky TORCH_EXTENSIONS_DIR others could plant them, so they go into our private root instead."""
    monkeypatch.delenv("DSINF_CACHE_DIR", raising=False)
    own = tmp_path / "ext"
    own.mkdir(mode=0o755)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(own))
    assert cache.data_root() == own
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(shared))
    assert cache.data_root() == shared / "dsinf"
    assert stat.S_IMODE((shared / "dsinf").stat().st_mode) == 0o700
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path / "chosen"))  # the user's explicit choice stands
    assert cache.data_root() == tmp_path / "chosen"
    assert stat.S_IMODE((tmp_path / "chosen").stat().st_mode) == 0o700


def test_a_dsinf_cache_dir_others_can_write_is_not_used_for_the_tables(tmp_path, monkeypatch, caplog):
    """DSINF_CACHE_DIR pointed at a shared dir (world-writable, sticky): another user could plant route or
    autotune tables there, which route our calls; it used to be used unchecked. Now it is passed over, once
    said, for the default place."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("DSINF_CACHE_DIR", str(shared))
    monkeypatch.setattr(cache, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="op_builder"):
        assert cache.data_root() == tmp_path / "ext"
    (warning,) = [r.getMessage() for r in caplog.records if "DSINF_CACHE_DIR" in r.getMessage()]
    assert str(shared) in warning and "writable" in warning


def test_previewing_says_where_the_roots_would_be_and_creates_nothing(tmp_path, monkeypatch):
    """The report previews the roots on a fresh machine: the same answers as the real calls, no directory
    made (the data root used to read as the cache root itself there, the parent not existing yet)."""
    for name in ("TORCH_EXTENSIONS_DIR", "DSINF_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with cache.previewing():
        root, data = cache.cache_root(), cache.data_root()
    assert not (tmp_path / "xdg").exists()
    assert (root, data) == (cache.cache_root(), cache.data_root()) == (tmp_path / "xdg" / "dsinf" / "extensions",
                                                                       tmp_path / "xdg" / "dsinf")


def test_cache_root_default_is_per_user(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "dsinf" / "extensions"


def test_variant_dir_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert TinyBuilder(fake_system()).variant_dir("cpu") == tmp_path / "ext" / "dsinf" / "tiny_test_op-cpu"


@pytest.mark.parametrize("with_xdg", [True, False])
def test_unwritable_root_falls_back_with_one_warning(tmp_path, monkeypatch, caplog, with_xdg):
    """A root that cannot be created (under a regular file: blocks root too) -> the per-user cache dir,
    or (that blocked too) <tmp>/dsinf-<uid>, created 0700; one warning naming both."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "ext"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg" if with_xdg else blocker / "xdg"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(cache.tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(cache, "_warned", set())
    with caplog.at_level("WARNING", logger="op_builder"):
        roots = [cache.cache_root() for _ in range(3)]
    assert roots[0] == roots[1] == roots[2]
    expected = (tmp_path / "xdg" / "dsinf" / "extensions" if with_xdg
                else tmp_path / "tmp" / f"dsinf-{os.getuid()}" / "extensions")
    assert roots[0] == expected and roots[0].is_dir()
    assert stat.S_IMODE(roots[0].stat().st_mode) == 0o700
    warnings = [r.getMessage() for r in caplog.records if "cannot build into" in r.getMessage()]
    assert len(warnings) == 1
    assert str(blocker / "ext") in warnings[0] and "TORCH_EXTENSIONS_DIR" in warnings[0]
    assert f"building into {expected}" in warnings[0]


# ------------------------------------------------------------------------------- manifests + trust
@pytest.fixture
def entry(tmp_path) -> tuple[Path, BuildKey]:
    key = BuildKey.of(op="tiny_test_op", variant="cpu", torch="2.13.0+cpu")
    directory = tmp_path / key.digest
    directory.mkdir()
    (directory / "lib.so").write_bytes(os.urandom(4096))
    write_manifest(directory, op="tiny_test_op", variant="cpu", key=key, library="lib.so", build_seconds=1.234,
                   extra={"isa": "avx2"})
    return directory, key


def test_manifest_is_readable_and_complete(entry):
    directory, key = entry
    m = read_manifest(directory)
    assert m["key"] == key.digest and m["key_fields"]["torch"] == "2.13.0+cpu"
    assert m["library"] == "lib.so" and m["library_size"] == 4096 and len(m["library_sha256"]) == 64
    assert m["isa"] == "avx2" and m["build_seconds"] == 1.23 and m["op"] == "tiny_test_op"
    assert not (directory / "manifest.json.tmp").exists()
    assert entry_problem(directory, key.digest) is None
    assert entry_problem(directory, None) is None


def test_missing_entry(tmp_path):
    assert entry_problem(tmp_path / "nope", "abc") == "not built"


def test_truncated_library_is_untrusted(entry):
    directory, key = entry
    lib = directory / "lib.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    assert "truncated" in entry_problem(directory, key.digest)


def test_corrupted_library_same_size_is_untrusted(entry):
    directory, key = entry
    lib = directory / "lib.so"
    data = bytearray(lib.read_bytes())
    data[2000] ^= 0xFF
    lib.write_bytes(bytes(data))
    assert "corrupted" in entry_problem(directory, key.digest)
    assert entry_problem(directory, key.digest, check_hash=False) is None  # size alone cannot tell


def test_missing_library_is_untrusted(entry):
    directory, key = entry
    (directory / "lib.so").unlink()
    assert "missing" in entry_problem(directory, key.digest)


def test_foreign_key_is_untrusted(entry):
    directory, _ = entry
    assert "does not match" in entry_problem(directory, "0" * 20)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", "null", '"str"'])
def test_garbled_manifest_is_untrusted(entry, content):
    directory, key = entry
    (directory / "manifest.json").write_text(content)
    assert "manifest missing or unreadable" in entry_problem(directory, key.digest)


def test_missing_manifest_is_untrusted(entry):
    directory, key = entry
    (directory / "manifest.json").unlink()
    assert "manifest missing" in entry_problem(directory, key.digest)


def test_other_manifest_format_is_untrusted(entry):
    directory, key = entry
    m = read_manifest(directory)
    m["format"] = 99
    (directory / "manifest.json").write_text(json.dumps(m))
    assert "format" in entry_problem(directory, key.digest)


# ----------------------------------------------------------------------------- malformed manifests
def _rewrite(directory: Path, **changes) -> None:
    m = read_manifest(directory)
    m.update(changes)
    (directory / "manifest.json").write_text(json.dumps(m))


def test_deeply_nested_manifest_is_unusable_not_a_crash(entry):
    directory, key = entry
    (directory / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    assert read_manifest(directory) is None
    assert "nested too deeply" in entry_problem(directory, key.digest)
    (directory / "manifest.json").write_text('{"format": 1, "key_fields": {"a": ' + "[" * 100000 + "]" * 100000 + "}}")
    assert "nested too deeply" in entry_problem(directory, key.digest)


@pytest.mark.parametrize("changes", [
    {"key_fields": {"cls": 1, "self": 2}},  # BuildKey.of(**fields) raised TypeError on `cls`
    {"key_fields": ["torch", "2.13"]},
    {"key_fields": "x"},
    {"library": 7},
    {"library": None},
    {"library_size": "4096"},
    {"kernels": "dsinf::x"},
    {"format": [1]},
    {"key": {"a": 1}},
])
def test_manifest_of_the_wrong_shape_is_a_reason_never_an_exception(entry, changes):
    directory, key = entry
    _rewrite(directory, **changes)
    problem = entry_problem(directory, key.digest)
    assert isinstance(problem, str) and problem


def test_key_fields_named_like_parameters_hash_fine():
    assert BuildKey.from_dict({"cls": 1, "self": 2}).digest == BuildKey.from_dict({"self": 2, "cls": 1}).digest


@pytest.mark.parametrize("library", ["../lib.so", "/etc/passwd", "sub/lib.so", "..", ".", "", "lib.so\0x"])
def test_manifest_library_must_be_a_file_name_inside_the_entry(entry, library):
    directory, key = entry
    _rewrite(directory, library=library)
    assert "not a file name inside the entry" in entry_problem(directory, key.digest)


def test_library_symlink_leaving_the_entry_is_refused(entry, tmp_path):
    directory, key = entry
    outside = tmp_path / "outside.so"
    (directory / "lib.so").rename(outside)
    os.symlink(outside, directory / "lib.so")
    assert "not a regular file" in entry_problem(directory, key.digest)


@pytest.mark.parametrize("what", ["dangling", "file"])
def test_non_directory_entry_is_not_trusted(tmp_path, what):
    path = tmp_path / "abc"
    if what == "dangling":
        os.symlink(tmp_path / "nowhere", path)
    else:
        path.write_text("x")
    assert "not a directory" in entry_problem(path, "abc")


def test_manifest_must_list_the_kernels_the_builder_requires(entry):
    directory, key = entry
    assert entry_problem(directory, key.digest, kernels=()) is None
    assert "requires" in entry_problem(directory, key.digest, kernels=("dsinf::linear",))


def test_world_writable_entry_or_library_is_not_trusted(entry):
    directory, key = entry
    (directory / "lib.so").chmod(0o666)
    assert "writable by other users" in entry_problem(directory, key.digest)
    (directory / "lib.so").chmod(0o755)
    directory.chmod(0o777)
    assert "writable by other users" in entry_problem(directory, key.digest)


# ------------------------------------------------------------------------ paths: the symlinks on the way
@pytest.fixture
def real_dir(tmp_path) -> Path:
    """tmp_path/real/dir, private: what a path through our own symlinks leads to."""
    d = tmp_path / "real" / "dir"
    d.mkdir(parents=True, mode=0o700)
    return d


def test_our_symlinks_midway_are_followed_to_a_trusted_dir(tmp_path, real_dir):
    """The user's own links (~/.cache -> /data/...) anywhere on the path: absolute, relative, chained,
    with `..` resolved from where the link leads, as the kernel does."""
    os.symlink(tmp_path / "real", tmp_path / "abs")
    os.symlink("real", tmp_path / "rel")
    os.symlink("rel", tmp_path / "chain")
    (tmp_path / "sub").mkdir()
    os.symlink("../real/dir/..", tmp_path / "sub" / "up")
    for path in ["abs/dir", "rel/dir", "chain/dir", "sub/up/dir", "chain"]:
        assert trust.dir_problem(tmp_path / path) is None, path


def test_a_symlink_midway_in_a_dir_others_may_write_is_refused(tmp_path, real_dir):
    """A link in a group/world-writable directory that is not sticky: anyone may replace it."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    os.symlink(tmp_path / "real", open_dir / "link")
    problem = trust.dir_problem(open_dir / "link" / "dir")
    assert problem and f"{open_dir} is writable by other users" in problem


def test_symlink_loop_or_dangling_link_midway_is_a_reason_not_a_crash(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    assert "more than 40 symlinks" in trust.dir_problem(tmp_path / "a" / "x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert "does not exist" in trust.dir_problem(tmp_path / "dangling" / "x")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in trust.dir_problem(tmp_path / "file")
    assert "cannot be inspected" in trust.dir_problem(tmp_path / "file" / "x")


def test_group_writable_dir_of_our_private_group_only(tmp_path, monkeypatch):
    """umask 002 systems: a group-writable dir is trusted when its group is our private one (named after us,
    no members) and no other account has it as its primary group (gr_mem does not list those)."""
    import grp
    import pwd

    d = tmp_path / "umask002"
    d.mkdir()
    d.chmod(0o775)
    os.chown(d, os.getuid(), os.getgid())  # our own primary group: any user may
    me, group, accounts = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()), pwd.getpwall()
    private = group.gr_name == me and set(group.gr_mem) <= {me} and \
        not any(a.pw_gid == os.getgid() and a.pw_name != me for a in accounts)  # root's, on CI
    assert (trust.dir_problem(d) is None) is private
    other = pwd.struct_passwd(("backup-svc", "x", 4242, os.getgid(), "", "/", "/bin/sh"))  # primary gid, no member
    monkeypatch.setattr(pwd, "getpwall", lambda: [*accounts, other])  # adding a real account would edit /etc
    assert "writable by other users (mode 775)" in trust.dir_problem(d)


# ------------------------------------------------------------------------------ roots: who owns them
def test_foreign_root_is_refused_and_a_private_one_used(tmp_path, monkeypatch, caplog):
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root (CI runs as root)")
    foreign = tmp_path / "ext" / "dsinf"
    foreign.mkdir(parents=True)
    os.chown(foreign, 12345, 12345)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache, "_warned", set())
    with caplog.at_level("WARNING", logger="op_builder"):
        assert cache.lookup_roots() == []  # nothing from it is even looked at
        assert cache.cache_root() == tmp_path / "xdg" / "dsinf" / "extensions"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{foreign} is owned by uid 12345" in text


def test_a_configured_root_not_made_yet_is_not_passed_over_for_the_fallbacks(tmp_path, monkeypatch):
    # TORCH_EXTENSIONS_DIR names a fresh directory: loads must not come from the per-user cache, even when it
    # holds an entry of the same key (the user chose where binaries live; builds will make that directory).
    fallback = tmp_path / "xdg" / "dsinf" / "extensions"
    fallback.mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "fresh" / "ext"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache, "_session_root", None)
    assert cache.lookup_roots() == []
    assert cache.cache_root() == tmp_path / "fresh" / "ext" / "dsinf"
    assert cache.lookup_roots() == [tmp_path / "fresh" / "ext" / "dsinf"]
    blocked = tmp_path / "file"
    blocked.write_text("x")  # a root that can never be made: a previous build went to the fallback
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocked / "ext"))
    assert fallback in cache.lookup_roots()


def test_predictable_tmp_fallback_taken_by_someone_else_gives_a_fresh_private_dir(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root (CI runs as root)")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "ext"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "xdg"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    taken = tmp / f"dsinf-{os.getuid()}"
    taken.mkdir(mode=0o777)
    os.chown(taken, 12345, 12345)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(cache.tempfile, "tempdir", None)
    monkeypatch.setattr(cache, "_session_root", None)
    root = cache.cache_root()
    assert root.is_relative_to(tmp) and not root.is_relative_to(taken)
    assert root.parent.name.startswith(f"dsinf-{os.getuid()}-") and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert cache.cache_root() == root  # one per process
