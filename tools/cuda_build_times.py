"""Per-translation-unit compile times of the CUDA inference module, with the builder's exact flags.

    python tools/cuda_build_times.py [--arch 9.0a] [--jobs N] [--check-sass]

Writes the ninja file `torch.utils.cpp_extension` would write for `InferenceBuilder().spec("cuda")` into a
temp dir, then times every compile one at a time (what bounds a cold build on a many-core machine is the
slowest one, plus the link) and the whole `ninja -j N` build. Needs nvcc and a C++ compiler, not a GPU:
`--arch` builds for the given targets when torch has no CUDA (the c10/cuda generated header a CPU wheel
lacks is stubbed). `--check-sass` compiles each .cu to a cubin with and without --split-compile and checks
that every kernel's code is byte-identical (the flag may only change how long the compile takes).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ninja_file(build_dir: Path, archs) -> tuple[Path, object]:
    import torch
    import torch.utils.cpp_extension as ce

    from dsinf.builder import InferenceBuilder
    from op_builder.archs import parse_arch_list
    from op_builder.build import write_ninja_file

    if ce.CUDA_HOME is None:  # a CPU torch: the toolkit the builder finds (CUDA_HOME, CUDA_PATH, nvcc's root)
        from op_builder.system import current_system

        ce.CUDA_HOME = current_system().cuda_home
    spec = InferenceBuilder().spec("cuda", archs=parse_arch_list(archs) if archs else None)
    ninja = write_ninja_file(spec, build_dir)  # the builder's own build.ninja
    if torch.version.cuda is None:  # a CPU wheel ships c10/cuda headers without their generated macros header,
        stub = build_dir / "stub" / "c10" / "cuda" / "impl"  # and no CUDA libraries to link
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        text = ninja.read_text().replace("cflags = ", f"cflags = -I{build_dir / 'stub'} ", 2)
        ninja.write_text(text.replace(" -lc10_cuda", "").replace(" -ltorch_cuda", ""))
    return ninja, spec


def _commands(build_dir: Path) -> list[tuple[str, str]]:
    """(output, shell command) of every compile, as ninja would run them."""
    out = subprocess.run(["ninja", "-t", "commands"], cwd=build_dir, capture_output=True, text=True, check=True)
    return [(line.rsplit(" -o ", 1)[1].split()[0], line) for line in out.stdout.splitlines() if " -c " in line]


def _cubin_code(path: Path) -> dict[str, str]:
    """{kernel section: sha1 of its code} of an ELF64 cubin."""
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]

    def name(offset: int) -> str:
        start = names + offset
        return data[start:data.index(b"\0", start)].decode()

    return {name(h[0]): hashlib.sha1(data[h[4]:h[4] + h[5]]).hexdigest() for h in headers
            if name(h[0]).startswith((".text.", ".nv.info."))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="CUDA targets, e.g. 9.0a (default: what the builder resolves)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="ninja jobs for the whole build")
    parser.add_argument("--check-sass", action="store_true", help="compare each kernel's SASS with/without split")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cuda-build-times-") as tmp:
        build_dir = Path(tmp)
        ninja, spec = _ninja_file(build_dir, args.arch)
        print(f"# {spec.label} {spec.describe}; nvcc flags: {' '.join(spec.cuda_cflags)}")
        for output, command in _commands(build_dir):
            start = time.monotonic()
            subprocess.run(command, shell=True, cwd=build_dir, check=True)
            print(f"{output:28s} {time.monotonic() - start:6.2f} s")
        for p in build_dir.glob("*.o"):
            p.unlink()
        start = time.monotonic()
        subprocess.run(["ninja", f"-j{args.jobs}"], cwd=build_dir, check=True, capture_output=True)
        print(f"{'ninja -j' + str(args.jobs) + ' (all + link)':28s} {time.monotonic() - start:6.2f} s")
        if args.check_sass:
            split = [f for f in shlex.split(" ".join(spec.cuda_cflags)) if "split-compile" in f]
            for output, command in _commands(build_dir):
                if not output.endswith(".cuda.o"):
                    continue
                plain = " ".join(a for a in shlex.split(command) if "split-compile" not in a
                                 and not (a == "-Xptxas" and split))
                base = build_dir / output
                subprocess.run(f"{shlex.join(shlex.split(command)).replace(' -c ', ' -cubin ')} -o {base}.split.cubin"
                               .replace(f" -o {output}", ""), shell=True, cwd=build_dir, check=True)
                subprocess.run(f"{plain.replace(' -c ', ' -cubin ')} -o {base}.plain.cubin".replace(f" -o {output}", ""),
                               shell=True, cwd=build_dir, check=True)
                a, b = _cubin_code(Path(f"{base}.split.cubin")), _cubin_code(Path(f"{base}.plain.cubin"))
                kernels = [k for k in a if k.startswith(".text.")]
                differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                print(f"{output:28s} {len(kernels)} kernels, {'SASS identical' if not differ else f'DIFFER: {differ}'}")
                if differ:
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
