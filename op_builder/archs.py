"""CUDA target architectures: parsing, resolution and nvcc flags.

Grammar of `TORCH_CUDA_ARCH_LIST` (torch's, plus what users actually write): entries separated by
';', ',' or whitespace; each is `X.Y`, `X.Ya` / `X.Yf` (arch-specific), `XY`, `sm_XY[a]`, or a family
name (Ampere, Hopper, ...), optionally followed by `+PTX`. DeepSpeed 0.19.8 crashes on `9.0a`; we
parse it, and anything we cannot parse is an `ArchListError` that names the entry and the grammar.

Resolution order (docs/DESIGN.md, build behaviour): the env list; else the visible GPUs (`9.0` -> `9.0a` when nvcc is new
enough, so Hopper-only instructions are available); else, with no GPU, a default derived from what
this nvcc can target (`nvcc --list-gpu-arch`), with PTX for the newest so future GPUs can JIT it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .system import System


class ArchListError(ValueError):
    pass


@dataclass(frozen=True, order=True)
class Arch:
    major: int
    minor: int
    suffix: str = ""  # "a" (arch-specific, e.g. sm_90a) or "f" (family) or ""
    ptx: bool = False  # also embed PTX for forward compatibility

    @property
    def capability(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def sm(self) -> str:
        return f"{self.major}{self.minor}{self.suffix}"

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}" + ("+PTX" if self.ptx else "")


FAMILIES = {
    "kepler": ("3.5", "3.7"), "maxwell": ("5.0", "5.2"), "pascal": ("6.0", "6.1"), "volta": ("7.0",),
    "turing": ("7.5",), "ampere": ("8.0", "8.6"), "ada": ("8.9",), "hopper": ("9.0",),
    "blackwell": ("10.0", "12.0"),
}
_ENTRY = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d+))?([af]?)(\+ptx)?$", re.I)
GRAMMAR = "expected entries like 8.0, 9.0a, 8.6+PTX or sm_90 separated by ';' or spaces"


def _parse_entry(token: str) -> list[Arch]:
    ptx = token.lower().endswith("+ptx")
    name = token[:-4] if ptx else token
    if name.lower() in FAMILIES:
        versions = FAMILIES[name.lower()]
        return [_parse_entry(v + ("+PTX" if ptx and i == len(versions) - 1 else ""))[0] for i, v in enumerate(versions)]
    m = _ENTRY.match(token)
    if not m:
        raise ArchListError(f"cannot parse CUDA arch {token!r}: {GRAMMAR}")
    whole, minor, suffix = m.group(1), m.group(2), m.group(3).lower()
    if minor is None:  # "90" / "sm_90": last digit is the minor version
        if len(whole) < 2:
            raise ArchListError(f"cannot parse CUDA arch {token!r}: {GRAMMAR}")
        major, minor_i = int(whole[:-1]), int(whole[-1])
    else:
        major, minor_i = int(whole), int(minor)
    if not (1 <= major <= 99 and 0 <= minor_i <= 9):
        raise ArchListError(f"CUDA arch {token!r} is out of range: {GRAMMAR}")
    return [Arch(major, minor_i, suffix, bool(m.group(4)))]


def parse_arch_list(text: str) -> tuple[Arch, ...]:
    """Parse a TORCH_CUDA_ARCH_LIST value into sorted, de-duplicated targets.

    Duplicates merge (`8.0;8.0+PTX` -> `8.0+PTX`). An empty list is an error: it would build nothing.
    """
    tokens = [t for t in re.split(r"[;,\s]+", text.strip()) if t]
    if not tokens:
        raise ArchListError(f"empty CUDA arch list {text!r}: {GRAMMAR}")
    merged: dict[tuple[int, int, str], bool] = {}
    for token in tokens:
        for arch in _parse_entry(token):
            key = (arch.major, arch.minor, arch.suffix)
            merged[key] = merged.get(key, False) or arch.ptx
    return tuple(sorted(Arch(ma, mi, su, ptx) for (ma, mi, su), ptx in merged.items()))


# Targets considered for a build with no GPU to look at: one per family people deploy inference on,
# from Ampere up, so the default build keeps its bf16 kernels (Turing users set TORCH_CUDA_ARCH_LIST).
DEFAULT_CANDIDATES = ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))


@dataclass(frozen=True)
class ArchResolution:
    archs: tuple[Arch, ...]
    source: str  # "TORCH_CUDA_ARCH_LIST", "visible GPUs" or "nvcc default"
    problems: tuple[str, ...] = ()  # reasons the list cannot be built (empty = fine)

    @property
    def ok(self) -> bool:
        return bool(self.archs) and not self.problems

    @property
    def bf16(self) -> bool:
        """bf16 kernels need every target >= 8.0."""
        return bool(self.archs) and all(a.major >= 8 for a in self.archs)


def _arch_specific_ok(nvcc_version: tuple[int, int] | None) -> bool:
    return nvcc_version is not None and nvcc_version >= (12, 0)


def resolve_archs(system: System, env_value: str | None) -> ArchResolution:
    nvcc = system.nvcc
    nvcc_archs = set(nvcc.archs) if nvcc else None
    if env_value:
        try:
            archs = parse_arch_list(env_value)
        except ArchListError as exc:
            return ArchResolution((), "TORCH_CUDA_ARCH_LIST", (str(exc),))
        source = "TORCH_CUDA_ARCH_LIST"
    elif system.gpu_list:
        caps = sorted({g.capability for g in system.gpu_list})
        archs = tuple(Arch(ma, mi, "a" if (ma, mi) == (9, 0) and _arch_specific_ok(nvcc and nvcc.version) else "",
                           ptx=False) for ma, mi in caps)
        source = "visible GPUs"
    else:
        if nvcc_archs is None:
            return ArchResolution((), "nvcc default", ("no nvcc to derive a default arch list from",))
        caps = [c for c in DEFAULT_CANDIDATES if c in nvcc_archs]
        if not caps:
            return ArchResolution((), "nvcc default", (f"nvcc supports none of {DEFAULT_CANDIDATES}",))
        archs = tuple(Arch(ma, mi, ptx=(ma, mi) == caps[-1]) for ma, mi in caps)
        source = "nvcc default"
    problems = []
    if nvcc_archs is not None:
        unsupported = [str(a) for a in archs if a.capability not in nvcc_archs]
        if unsupported:
            problems.append(f"nvcc {nvcc.version_str} cannot target {', '.join(unsupported)} "
                            f"(it supports {', '.join(f'{a}.{b}' for a, b in sorted(nvcc_archs))})")
        if any(a.suffix for a in archs) and not _arch_specific_ok(nvcc.version):
            problems.append(f"arch-specific targets (e.g. 9.0a) need nvcc >= 12.0, have {nvcc.version_str}")
    return ArchResolution(archs, source, tuple(problems))


def nvcc_gencode_flags(archs: tuple[Arch, ...]) -> list[str]:
    """-gencode flags: SASS for each target, plus PTX where asked."""
    flags = []
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a.sm},code=sm_{a.sm}")
        if a.ptx:
            flags.append(f"-gencode=arch=compute_{a.sm},code=compute_{a.sm}")
    return flags


def covers(built: tuple[Arch, ...], capability: tuple[int, int]) -> bool:
    """Can a binary built for `built` run on a GPU of `capability`? Exact SASS (same major, minor <=
    for plain targets; arch-specific 'a' only on the exact chip) or PTX of an older-or-equal target."""
    for a in built:
        if a.suffix == "a" and a.capability == capability:
            return True
        if a.suffix in ("", "f") and a.major == capability[0] and a.minor <= capability[1]:
            return True
        if a.ptx and not a.suffix and a.capability <= capability:  # 'a'/'f' PTX is not forward-portable
            return True
    return False
