"""The sections, as data: adding one is one entry here. A section is a function `f(ctx)` named as
"module:function" and imported only when it runs; an `optional` one whose module is absent reports
"not available" instead of failing the run."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .cases import OPS_PARTS


@dataclass(frozen=True)
class Section:
    name: str
    target: str  # "module:function"; the function takes the Context
    what: str
    devices: tuple[str, ...] = ("cpu", "cuda")  # the --device values that run it by default
    default: bool = True  # runs without --only
    optional: bool = False  # its module may be absent


SECTIONS: tuple[Section, ...] = (
    Section("build", "bench.build_times:section_build",
            "cold JIT build per variant, load() of all variants, warm loads, import dsinf overhead"),
    Section("cpu", "bench.ops:section_cpu", "our ops vs torch on this machine's CPU", devices=("cpu",)),
    Section("cuda", "bench.ops:section_cuda", "our ops vs torch/cuBLAS on the GPU", devices=("cuda",)),
    Section("hostcost", "bench.host_cost:section_host_cost", "per-call host cost beside F.linear (CPU, CUDA)"),
    Section("e2e", "bench.e2e:section", "end-to-end Hugging Face decode (bench/e2e.py)", default=False,
            optional=True),
)
BY_NAME = {s.name: s for s in SECTIONS}
CHOICES = tuple(BY_NAME) + OPS_PARTS


def select(only: set[str], device: str, build_times: bool | None) -> tuple[list[str], set[str]]:
    """(sections to run, in registry order; parts of the ops sections) from --only / --device / --build-times.

    No --only: every default section for the device (build unless --no-build-times). With --only:
    the named sections; a part (decode, int8, ...) alone runs that part of the device's ops section,
    and with "cpu"/"cuda" restricts that section to it. --no-build-times wins."""
    bad = only - set(CHOICES)
    if bad:
        raise ValueError(f"unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(CHOICES)}")
    named_parts = only & set(OPS_PARTS)
    parts = named_parts or set(OPS_PARTS)
    if not only:
        chosen = [s.name for s in SECTIONS if s.default and device in s.devices]
    else:
        alone = named_parts and not only & {"cpu", "cuda"}  # parts without an ops section: the device's
        chosen = [s.name for s in SECTIONS if s.name in only or (alone and s.name == device)]
    if build_times is False and "build" in chosen:
        chosen.remove("build")
    return chosen, parts


def resolve(section: Section):
    """The section's function, or a string saying why it is not available (optional sections only)."""
    mod_name, fn_name = section.target.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if section.optional and exc.name == mod_name:
            return f"not available: {mod_name} is not part of this tree"
        raise
    fn = getattr(module, fn_name, None)
    if fn is None:
        return f"not available: {mod_name} has no {fn_name}()"
    return fn
