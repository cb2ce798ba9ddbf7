"""`DS_BUILD_OPS=1 pip install --no-build-isolation .`: compile ops into the package.

`plan()` is a pure decision over the environment and the builders' compatibility: which variants to
build, which to skip and why. An op (or variant) asked for explicitly with `DS_BUILD_<OP>=1` (or
`DS_BUILD_<OP>_<VARIANT>=1`) that cannot build here fails the install at once with the reason;
`DS_BUILD_OPS=1` alone builds what it can and says what it skipped (DeepSpeed skipped both silently).

Prebuilt binaries use the portable spec (baseline CPU ISA, the default CUDA arch list plus the
build host's GPUs) and carry the same manifest as JIT entries; `load()` validates it at run time.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import knobs
from .build import build_or_wait
from .compat import Decision
from .registry import ALL_OPS

log = logging.getLogger("op_builder")


class PrebuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class PlanItem:
    op: str
    variant: str
    build: bool
    explicit: bool  # asked for by DS_BUILD_<OP>[_<VARIANT>]=1
    why: str  # reason for skipping, or "" when built
    var: str = "DS_BUILD_OPS"  # the variable that decided


def _request(op_var: str, variant: str) -> tuple[bool, bool, str]:
    """(enabled, explicit, deciding variable) for one variant, from DS_BUILD_<OP>_<VARIANT>,
    DS_BUILD_<OP>, DS_BUILD_OPS in that order."""
    for var in (f"{op_var}_{variant.upper()}", op_var):
        value = knobs.build_var_enabled(var)
        if value is not None:
            return value, value, var
    return bool(knobs.get("DS_BUILD_OPS")), False, "DS_BUILD_OPS"


def requested() -> bool:
    """Does the environment ask for any prebuilt op?"""
    if knobs.get("DS_BUILD_OPS"):
        return True
    return any(_request(b.BUILD_VAR, v)[0] for b in ALL_OPS.values() for v in b.VARIANTS)


def plan(compatible=None) -> list[PlanItem]:
    """What to build. `compatible(builder, variant) -> Decision` is injectable for tests."""
    compatible = compatible or (lambda builder, variant: builder.compatible(variant))
    items = []
    for name, builder in ALL_OPS.items():
        for variant in builder.VARIANTS:
            enabled, explicit, var = _request(builder.BUILD_VAR, variant)
            if not enabled:
                items.append(PlanItem(name, variant, False, explicit, "not requested", var))
                continue
            decision: Decision = compatible(builder, variant)
            why = "; ".join(decision.reasons)
            items.append(PlanItem(name, variant, decision.ok, explicit, "" if decision.ok else why, var))
    failures = [i for i in items if i.explicit and not i.build and i.why != "not requested"]
    # An op asked for as a whole fails only if none of its variants can build.
    by_op: dict[str, list[PlanItem]] = {}
    for item in items:
        by_op.setdefault(item.op, []).append(item)
    fatal = []
    for item in failures:
        per_variant = knobs.build_var_enabled(f"{ALL_OPS[item.op].BUILD_VAR}_{item.variant.upper()}")
        if per_variant or not any(i.build for i in by_op[item.op]):
            fatal.append(item)
    if fatal:
        lines = [f"{i.var}: {i.op}[{i.variant}] cannot be built here: {i.why}" for i in fatal]
        raise PrebuildError("requested prebuilt op(s) cannot be built:\n  " + "\n  ".join(lines))
    return items


def build_into(package_dir: Path) -> list[PlanItem]:
    """Build every planned variant and copy it to `package_dir/prebuilt/<op>-<variant>/`."""
    items = plan()
    for item in items:
        if not item.build:
            if item.why != "not requested":
                log.warning("op_builder: skipping prebuilt %s[%s]: %s", item.op, item.variant, item.why)
            continue
        builder = ALL_OPS[item.op]
        spec = builder.spec(item.variant, portable=True)
        key = builder.key(item.variant, spec)
        with tempfile.TemporaryDirectory(prefix="dsinf-prebuild-") as tmp:
            entry, _ = build_or_wait(spec, key, Path(tmp), system_cpu_count=builder.system.cpu_count,
                                     memory_available=builder.system.memory_available)
            dest = package_dir / "prebuilt" / f"{item.op}-{item.variant}"
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(entry, dest)
        log.warning("op_builder: prebuilt %s[%s] %s", item.op, item.variant, spec.describe)
    return items
