"""Every use of dsinf's and op_builder's internals by the bench, in one place (they are being
restructured: adapt here, nothing else in `bench/` reaches past the public API)."""
from __future__ import annotations

import time
from typing import Any

from .context import first_line

#: Marks the JSON line a child process prints for the build section.
MARK = "@@DSINF_BENCH@@"

#: Child: load (building if needed) one variant; prints how it loaded and what the manifest says.
LOAD_CHILD = f"""
import json, sys, time
import torch
t0 = time.perf_counter()
from op_builder import InferenceBuilder
variant = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "all" else None
InferenceBuilder().load(variant)
dt = time.perf_counter() - t0
from op_builder.builder import loaded_variants
lvs = [lv for (op, v), lv in loaded_variants().items() if op == InferenceBuilder.NAME]
lv = lvs[0]
print({MARK!r} + json.dumps({{"in_process": dt, "how": ",".join(sorted({{x.how for x in lvs}})),
      "variants": sorted(v for (op, v) in loaded_variants() if op == InferenceBuilder.NAME),
      "load_seconds": lv.seconds, "build_seconds": lv.manifest.get("build_seconds"),
      "describe": lv.manifest.get("describe"), "archs": lv.manifest.get("archs"), "isa": lv.manifest.get("isa"),
      "path": str(lv.path), "cuda_initialized": bool(torch.cuda.is_initialized())}}))
"""

#: Child: time `import dsinf` after `import torch`, and what the import pulled in.
IMPORT_CHILD = f"""
import json, sys, time
import torch
t0 = time.perf_counter()
import dsinf
dt = time.perf_counter() - t0
print({MARK!r} + json.dumps({{"in_process": dt, "triton_imported": "triton" in sys.modules,
      "op_builder_imported": "op_builder" in sys.modules,
      "cuda_initialized": bool(torch.cuda.is_initialized())}}))
"""


def cached_build_missing(variant: str) -> str | None:
    """None when the JIT cache holds a usable build of `variant`, else why not."""
    try:
        from op_builder import InferenceBuilder

        return InferenceBuilder().cached_entry(variant)[1]
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {first_line(exc)}"


def load_module(kind: str) -> tuple[Any, str]:
    """(the compiled module for `kind`, how it loaded) or (None, why not)."""
    try:
        from op_builder import InferenceBuilder
        from op_builder.builder import loaded_variants

        t0 = time.perf_counter()
        module = InferenceBuilder().load(kind)
        lv = loaded_variants().get((InferenceBuilder.NAME, kind))
        return module, (f"{lv.how} in {time.perf_counter() - t0:.2f} s" if lv else "loaded")
    except Exception as exc:  # noqa: BLE001 - any failure makes the column n/a, with the reason
        return None, f"{type(exc).__name__}: {first_line(exc)}"


def module_function(module, fname: str, device: str):
    """The compiled function `fname` for `device`, or a string saying why there is none."""
    try:
        if not module.has(fname, device):
            return f"{fname} is not compiled for {device}"
        return getattr(module, fname)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {first_line(exc)}"


def load_triton() -> tuple[Any, str]:
    """(dsinf.triton, "ok") or (None, why not). Imports triton and the kernels now, so a failure shows here."""
    try:
        from dsinf import triton as dt

        ok, why = dt.available()
        if not ok:
            return None, why
        dt.vector_matmul  # noqa: B018
        return dt, "ok"
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {first_line(exc)}"


def triton_supports(tri, weight_dtype, device: str, capability) -> tuple[bool, str]:
    return tri.supports(weight_dtype, device, capability)


def op_class(name: str):
    """dsinf's op class `name` (e.g. "MLPGemmOp"), or None while dsinf has no such op."""
    import dsinf

    return getattr(dsinf, name, None)


def enum_member(enum_name: str, member: str):
    """dsinf.config's enum member (e.g. NormType.RMSNorm), or None where it does not exist."""
    from dsinf import config

    enum = getattr(config, enum_name, None)
    return getattr(enum, member, None) if enum is not None else None
