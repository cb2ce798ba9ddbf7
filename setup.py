"""Packaging: only the DS_BUILD_OPS logic lives here; metadata is in setup.cfg.

`pip install .` is pure Python (works with build isolation; ops compile on first use).
`DS_BUILD_OPS=1 pip install --no-build-isolation .` compiles every op this machine can build into
the package (`DS_BUILD_<OP>=1/0` per op); it needs torch in the build environment. Such a build holds
a native library, so its wheel carries a platform tag (cp311-cp311-linux_x86_64, not py3-none-any);
each binary's manifest records the CPU ISA it was built for, and load() refuses it, falling back to a
JIT build with the reason, on a machine without that ISA.
"""
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _prebuilt():
    sys.path.insert(0, str(ROOT))
    from op_builder import knobs, prebuilt

    return knobs, prebuilt


class DistributionWithOps(Distribution):
    def has_ext_modules(self):
        """True when prebuilt ops are asked for: the package then holds a native library, which makes
        bdist_wheel tag the wheel for this platform and Python, and install it as platlib."""
        knobs, prebuilt = _prebuilt()
        try:
            return prebuilt.requested()
        except knobs.KnobError:
            return False  # build_py below stops the build with the message


class BuildPyWithOps(build_py):
    def run(self):
        super().run()
        package_dir = Path(self.build_lib) / "op_builder"
        # build_lib (build/lib.*) keeps what an earlier run put there: a kernel source deleted since (the CPU
        # build compiles every cpu/*.cpp) or the binary of a variant not asked for now would ship again.
        for stale in ("csrc", "prebuilt"):
            shutil.rmtree(package_dir / stale, ignore_errors=True)
        # Kernel sources travel with the package so JIT builds work from an installed wheel.
        shutil.copytree(ROOT / "csrc", package_dir / "csrc")
        knobs, prebuilt = _prebuilt()
        try:
            if not prebuilt.requested():
                return
        except knobs.KnobError as exc:
            sys.exit(f"error: {exc}")
        if getattr(self, "editable_mode", False):  # build_lib is a temp dir the editable install discards
            print("warning: DS_BUILD_OPS / DS_BUILD_<OP> is ignored by an editable install (pip install -e): "
                  "a checkout's ops build on first use into the JIT cache. To ship binaries, install without -e: "
                  "pip install --no-build-isolation .", file=sys.stderr)
            return
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("error: DS_BUILD_OPS / DS_BUILD_<OP> needs torch in the build environment: "
                     "install torch first, then use `pip install --no-build-isolation .`")
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            prebuilt.build_into(package_dir)
        except prebuilt.PrebuildError as exc:
            sys.exit(f"error: {exc}")


setup(distclass=DistributionWithOps, cmdclass={"build_py": BuildPyWithOps})
