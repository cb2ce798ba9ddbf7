"""The visible GPUs from NVML, without initialising CUDA.

Why: the JIT cache key holds the GPUs' compute capabilities, so every load, warm ones included, must
know them. torch answers through the CUDA runtime, whose initialisation took 0.19-0.21 s on an H200
machine (of a 0.31 s warm load there); NVML (libnvidia-ml, which ships with the driver) answers the same
question in milliseconds and leaves CUDA untouched, so `load()` before a `fork()` leaves the children
free to use the GPU. The probe asks NVML first in every process, CUDA up or not, so every process names
a GPU alike (the measured routes are keyed by its name).

NVML numbers GPUs in PCI bus order and ignores CUDA_VISIBLE_DEVICES; CUDA applies that variable and by
default numbers the fastest GPU first. `visible_gpus` maps one to the other only where the answer is
certain, and otherwise returns None, and the caller asks torch:
- CUDA_VISIBLE_DEVICES unset, or a list of distinct in-range indices or `GPU-` UUID prefixes that each
  match one GPU (anything else - MIG entries, negative or repeated indices, an empty value - is left
  to CUDA's own rules);
- no GPU in MIG mode (CUDA then lists MIG instances, not GPUs);
- the order: where GPUs differ in name or capability, NVML's order is CUDA's only with
  CUDA_DEVICE_ORDER=PCI_BUS_ID, and both an index in CUDA_VISIBLE_DEVICES and the numbering of the
  visible GPUs (which labels the report and the compatibility messages) follow CUDA's order. A list of
  UUIDs alone names the GPUs in the order CUDA numbers them;
- the driver runs CUDA of torch's major version or newer (an older one is torch's to explain).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

_NAME_LEN = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE
_UUID_LEN = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE


@dataclass(frozen=True)
class NvmlGpu:
    name: str
    capability: tuple[int, int]
    uuid: str


def parse_visible(value: str | None, uuids: list[str]) -> list[int] | None:
    """NVML indices of the CUDA devices 0, 1, ... under CUDA_VISIBLE_DEVICES=`value` (None: unset), given
    every GPU's UUID in NVML order; None when the value is not one this module can map with certainty."""
    if value is None:
        return list(range(len(uuids)))
    entries = [e.strip() for e in value.split(",")]
    if not value.strip() or any(not e for e in entries):
        return None
    out: list[int] = []
    for e in entries:
        if e.isdigit():
            i = int(e)
            if i >= len(uuids):
                return None
        elif e.startswith("GPU-"):
            hits = [i for i, u in enumerate(uuids) if u.startswith(e)]
            if len(hits) != 1:
                return None
            i = hits[0]
        else:  # MIG-..., a negative index, anything else
            return None
        if i in out:
            return None
        out.append(i)
    return out


def order_is_certain(every: list[NvmlGpu], visible: str | None, device_order: str | None) -> bool:
    """Whether CUDA's numbering can be read off NVML's: CUDA_VISIBLE_DEVICES names GPUs by UUID only,
    or every GPU is alike, or PCI bus order was asked for (CUDA's default puts the fastest first)."""
    if visible is not None and visible.strip() and all(e.strip().startswith("GPU-") for e in visible.split(",")):
        return True
    return len({(g.name, g.capability) for g in every}) <= 1 or device_order == "PCI_BUS_ID"


def _load():
    try:
        return ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None


def _all_gpus(lib, torch_cuda_major: int) -> list[NvmlGpu] | None:
    """Every GPU NVML sees, in its order; None when NVML cannot answer for all of them."""
    version = ctypes.c_int()
    if lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(version)) != 0:
        return None
    if version.value // 1000 < torch_cuda_major:
        return None
    count = ctypes.c_uint()
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return None
    gpus = []
    for i in range(count.value):
        handle = ctypes.c_void_p()
        name = ctypes.create_string_buffer(_NAME_LEN)
        uuid = ctypes.create_string_buffer(_UUID_LEN)
        major, minor = ctypes.c_int(), ctypes.c_int()
        mig, pending = ctypes.c_uint(), ctypes.c_uint()
        if (lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(handle)) != 0
                or lib.nvmlDeviceGetName(handle, name, ctypes.c_uint(_NAME_LEN)) != 0
                or lib.nvmlDeviceGetUUID(handle, uuid, ctypes.c_uint(_UUID_LEN)) != 0
                or lib.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0):
            return None
        # NOT_SUPPORTED (no MIG on this GPU) is fine; enabled MIG is CUDA's to enumerate
        if lib.nvmlDeviceGetMigMode(handle, ctypes.byref(mig), ctypes.byref(pending)) == 0 and mig.value:
            return None
        gpus.append(NvmlGpu(name.value.decode(errors="replace"), (major.value, minor.value),
                            uuid.value.decode(errors="replace")))
    return gpus


def visible_gpus(torch_cuda: str, visible: str | None, device_order: str | None) -> list[NvmlGpu] | None:
    """The GPUs CUDA would number 0, 1, ... for a torch built with CUDA `torch_cuda` ("13.0"), under
    CUDA_VISIBLE_DEVICES=`visible` and CUDA_DEVICE_ORDER=`device_order` (None: unset); None when NVML is
    absent or the answer is not certain (the module docstring lists when)."""
    lib = _load()
    if lib is None or lib.nvmlInit_v2() != 0:
        return None
    try:
        every = _all_gpus(lib, int(torch_cuda.split(".")[0]))
        if every is None:
            return None
        indices = parse_visible(visible, [g.uuid for g in every])
        if indices is None or not order_is_certain(every, visible, device_order):
            return None
        return [every[i] for i in indices]
    finally:
        lib.nvmlShutdown()
