"""Packaging: only the DS_BUILD_OPS logic lives here; metadata is in setup.cfg.

`pip install .` is pure Python (works with build isolation; ops compile on first use).
`DS_BUILD_OPS=1 pip install --no-build-isolation .` compiles every op this machine can build into
the package (`DS_BUILD_<OP>=1/0` per op); it needs torch in the build environment.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithOps(build_py):
    def run(self):
        super().run()
        package_dir = Path(self.build_lib) / "op_builder"
        # Kernel sources travel with the package so JIT builds work from an installed wheel.
        shutil.copytree(ROOT / "csrc", package_dir / "csrc", dirs_exist_ok=True)
        sys.path.insert(0, str(ROOT))
        from op_builder import knobs, prebuilt

        try:
            if not prebuilt.requested():
                return
        except knobs.KnobError as exc:
            sys.exit(f"error: {exc}")
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


setup(cmdclass={"build_py": BuildPyWithOps})
