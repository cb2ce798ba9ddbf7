"""Launchers of the Triton backend: validation, config choice, kernel launches, autotuning entry points.

`linear_layer` / `vector_matmul` have the signatures and semantics of `dsinf.reference` (the oracle),
validate through `dsinf.checks` and return fresh tensors from the torch allocator.

Config choice per call (hot path): a memo keyed by (device, dtype, layout, M bucket, N, K) answers
in one dict lookup; on a miss, the persisted table (`autotune.lookup`) is asked once, else a
heuristic default is used. Nothing is benchmarked at call time (a surprise multi-second stall, and
fatal under CUDA-graph capture): tuning happens only in `autotune_linear` / `autotune_vector_matmul`,
which the op classes' `_triton_autotune` call.

Paths by M = B*S (candidates and defaults below; the table overrides the defaults):
- M <= 16 (decode): BLOCK_M = 16, one M-tile, so the weight is streamed exactly once; narrow N-tiles
  and deep K-tiles, and split-K only when the N-tiles alone cannot fill half the GPU. [N, K] weights
  (float and int8) also race the GEMV kernel (KERNEL 3), which makes the weight tile the dot's left
  operand instead of transposing it, and the slices kernel (KERNEL 4), the same with K split over the
  warps of a program.
- 16 < M <= 128: 32..64-row tiles, split-K allowed.
- M > 128: 64..256 square-ish tiles with GROUP_M swizzle (compute-bound; the cuBLAS regime). On
  sm_90+ with fp16/bf16 weights whose operands a TMA descriptor can describe (`tma_eligible`,
  `_tma_operands`), also the TMA kernels, one program per tile or persistent; a config's KERNEL key
  says which kernel runs it (absent: the pointer kernel, as in tables written before the TMA kernels).

Measured on H100 80GB (triton 3.6, CUDA-graph timing, weights rotated past L2; noise on M=2048 is
about +-10% run to run): decode M=1..16 fp16/bf16 at 0.98-1.08x torch (2.3-2.9 TB/s; 4096x4096 is
launch-latency bound at ~14.5 us), int8 M=1 8192^2 at 1.6x fp16 torch; M=2048 [K, N] fp16 0.95-1.03x
cuBLAS, bf16 0.86-0.95x, [N, K] 0.69-0.87x, int8 0.58-0.67x. Eager calls pay Triton's launch cost
(~20 us of CPU per launch on that host, plus ~20 us of ours): use CUDA graphs for decode.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import hashlib
import inspect
import logging
import math
import struct
from typing import Callable, Iterator, NamedTuple

import torch
import triton

try:  # host-built TMA descriptors (triton >= 3.4); without them the pointer kernel serves every config
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None

from op_builder import knobs

from .. import checks, reference
from . import autotune, kernels
from . import decide as _decide

logger = logging.getLogger(__name__)

#: Whether `kernels` were built for the Triton interpreter (TRITON_INTERPRET=1 when it was imported).
INTERPRETED = not isinstance(kernels._matmul_kernel, triton.runtime.JITFunction)

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages")
#: Which matmul kernel runs a config (its KERNEL key).
KERNEL_POINTER = 0  # `_matmul_kernel`: any operands, split-K, int8 weights
KERNEL_TMA = 1  # `_matmul_tma_kernel` with one program per output tile
KERNEL_TMA_PERSISTENT = 2  # `_matmul_tma_kernel` persistent: min(#SMs, tiles) programs loop over the tiles
KERNEL_GEMV = 3  # `_gemv_kernel`: [N, K] weights (float and int8) as the dot's left operand
KERNEL_GEMV_SLICES = 4  # `_gemv_slices_kernel`: the GEMV kernel with K split over the warps of a program
KERNEL_NAMES = {KERNEL_POINTER: "pointer", KERNEL_TMA: "tma", KERNEL_TMA_PERSISTENT: "tma-persistent",
                KERNEL_GEMV: "gemv", KERNEL_GEMV_SLICES: "gemv-slices"}
#: Keys a config may leave out, with the value their absence means: entries persisted before the TMA
#: kernels existed have none of them and stay valid, as pointer-kernel configs. SLICES: the K-slices per
#: program of `_gemv_slices_kernel` (1 for every other kernel).
OPTIONAL_KEYS = {"KERNEL": KERNEL_POINTER, "EPILOGUE_SUBTILE": 0, "SLICES": 1}
_TMA_MAX_BLOCK = 256  # a TMA box is at most 256 elements per dimension
#: int8 weights converted with PTX byte tricks (`kernels._int8_to`), not one conversion per weight; the
#: interpreter runs no PTX. A module attribute so a probe can time both.
ASM_I8 = not INTERPRETED
_REDUCE_BLOCK = 1024


# ---------------------------------------------------------------------------------------------------
# Devices, keys, configs


@functools.lru_cache(maxsize=None)
def _backend_decision(weight_dtype: torch.dtype, act_dtype: torch.dtype, device_type: str) -> tuple[bool, str]:
    dtype = torch.int8 if weight_dtype == torch.int8 else act_dtype
    return _decide(dtype, device_type, interpreter=INTERPRETED, act_dtype=act_dtype)


def _check_backend(op: str, input: torch.Tensor, weight: torch.Tensor) -> None:
    ok, reason = _backend_decision(weight.dtype, input.dtype, input.device.type)
    if not ok:
        raise checks.InputError(op, "input", f"not supported by the Triton backend: {reason}")


class DeviceInfo(NamedTuple):
    name: str  # goes into the table key
    sms: int  # multiprocessors: sizes split-K and the persistent kernel's grid
    smem: int  # shared memory per block (bytes): prunes candidates
    l2: int  # L2 bytes: autotuning rotates weight copies past it
    tma: bool  # the TMA kernels can run: sm_90+ (or the interpreter) and a triton with TensorDescriptor


@functools.lru_cache(maxsize=None)
def _device_info(device_type: str, index: int | None) -> DeviceInfo:
    has_desc = TensorDescriptor is not None
    if device_type != "cuda" or INTERPRETED:
        return DeviceInfo("triton-interpreter", 4, 1 << 30, 0, has_desc)
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem:
        try:
            smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
        except Exception:  # pragma: no cover - depends on the driver
            smem = 99 * 1024
    return DeviceInfo(props.name, props.multi_processor_count, int(smem), int(getattr(props, "L2_cache_size", 50 << 20)),
                      has_desc and props.major >= 9)


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """Hash of the tuned kernels' source text: editing them invalidates their table entries."""
    h = hashlib.sha256()
    for k in (kernels._grouped_tile, kernels._int8_to, kernels._tile_ranges, kernels._store_tile,
              kernels._matmul_kernel, kernels._gemv_kernel, kernels._gemv_slices_kernel, kernels._tma_tile,
              kernels._tma_epilogue, kernels._matmul_tma_kernel, kernels._splitk_reduce_kernel):
        h.update(inspect.getsource(getattr(k, "fn", k)).encode())
    h.update((kernels._I8_TO_F16_ASM.value + kernels._I8_TO_BF16_ASM.value).encode())
    return h.hexdigest()[:12]


def _layout(shape: checks.MatmulShape) -> str:
    return "int8" if shape.int8 else ("nk" if shape.weight_nk else "kn")


def tune_key(device: torch.device, dtype: torch.dtype, layout: str, m: int, n: int, k: int) -> autotune.TuneKey:
    name = _device_info(device.type, device.index).name
    # ASM_I8 changes the int8 kernels' code: a table entry tuned with the plain cast is not one for them.
    source = _source_hash() + ("" if ASM_I8 else "-cast")
    return autotune.TuneKey(kernel="matmul", gpu=name, triton=triton.__version__, source=source,
                            dtype=checks.DTYPE_SUFFIX[dtype], layout=layout, m=autotune.m_bucket(m), n=n, k=k)


def _config(bm, bn, bk, split=1, warps=4, stages=3, group=8, kernel=KERNEL_POINTER, subtile=0, slices=1) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SPLIT_K": split,
            "num_warps": warps, "num_stages": stages, "KERNEL": kernel, "EPILOGUE_SUBTILE": subtile, "SLICES": slices}


def valid_config(cfg) -> bool:
    """A config we can launch: every required key (optional ones per OPTIONAL_KEYS), ints, power-of-two
    blocks >= 16 (tl.dot), sane ranges; TMA kernels: no split-K, blocks <= a TMA box, and an epilogue
    subtile of at least 16 columns; K-slices (a power of two up to 16) on the slices kernel only."""
    if not isinstance(cfg, dict) or not set(CONFIG_KEYS) <= set(cfg) <= set(CONFIG_KEYS) | set(OPTIONAL_KEYS):
        return False
    if not all(type(v) is int for v in cfg.values()):
        return False
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    blocks = [cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]
    kernel = cfg.get("KERNEL", KERNEL_POINTER)
    subtile = cfg.get("EPILOGUE_SUBTILE", 0)
    slices = cfg.get("SLICES", 1)
    if kernel not in KERNEL_NAMES or subtile not in (0, 1) or slices not in (1, 2, 4, 8, 16):
        return False
    if slices > 1 and kernel != KERNEL_GEMV_SLICES:
        return False
    tma_kernel = kernel in (KERNEL_TMA, KERNEL_TMA_PERSISTENT)
    if tma_kernel and (cfg["SPLIT_K"] != 1 or max(blocks) > _TMA_MAX_BLOCK):
        return False
    if subtile and (not tma_kernel or cfg["BLOCK_N"] < 32):
        return False
    return (all(pow2(b) and 16 <= b <= 512 for b in blocks)
            and 1 <= cfg["SPLIT_K"] <= 64 and 1 <= cfg["GROUP_M"] <= 64
            and cfg["num_warps"] in (1, 2, 4, 8, 16) and 1 <= cfg["num_stages"] <= 8)


def tma_eligible(info: DeviceInfo, layout: str, itemsize: int, n: int, k: int) -> bool:
    """Whether a problem's configs may use the TMA kernels: a device that has them, float weights
    ("nk" or "kn"; int8 keeps the pointer kernel), and rows of x [M, K], W and out [M, N] that are
    multiples of 16 bytes (a TMA stride rule: K and N multiples of 8 for fp16/bf16). Per call,
    `_tma_operands` also checks the actual tensors' alignment."""
    return info.tma and layout in ("nk", "kn") and (k * itemsize) % 16 == 0 and (n * itemsize) % 16 == 0


def _useful_splits(tiles: int, k: int, bk: int, sms: int, max_split: int = 16) -> list[int]:
    """Split-K factors worth trying: 1, then powers of two while the grid is under ~2 waves and
    every split still has at least two K-tiles to stream."""
    out, s = [1], 2
    while s <= max_split and tiles * (s // 2) < 2 * sms and k >= 2 * bk * s:
        out.append(s)
        s *= 2
    return out


#: M > 128 TMA candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, subtile). Measured on H200 (triton 3.6,
#: M=2048 K=4096 N=12288 [N, K], one program per tile, fraction of cuBLAS): fp16 128x128x64 w4 s4 0.888x,
#: 128x128x128 w8 s3 0.858x, 128x256x64 w8 s4 0.845x, 256x128x64 w8 s3 0.828x (bf16 within 0.015 of these);
#: 128x256x64 s5 does not fit in shared memory. The persistent kernel and the neighbours of the best are
#: in the race for the table to decide.
_TMA_SHAPES = [(128, 128, 64, 4, 4, 0), (128, 128, 64, 4, 5, 0), (128, 128, 64, 8, 4, 0), (128, 128, 128, 8, 3, 0),
               (128, 256, 64, 8, 3, 0), (128, 256, 64, 8, 4, 0), (256, 128, 64, 8, 3, 0)]
_TMA_PERSISTENT_SHAPES = [(128, 128, 64, 4, 4, 0), (128, 128, 64, 4, 5, 0), (128, 128, 64, 8, 4, 0),
                          (128, 128, 64, 4, 5, 1), (128, 128, 128, 8, 3, 0), (128, 256, 64, 8, 3, 0),
                          (128, 256, 64, 8, 3, 1), (128, 256, 64, 8, 4, 1)]


#: M <= 16 GEMV-kernel candidates (BLOCK_N, BLOCK_K, warps, stages); BLOCK_M = 16. Winners on H200: see
#: `default_config`; the 16-row tiles and the deeper 32-row pipelines are there for 4096x4096 int8, where
#: the CUDA module (16-row tiles) is 1.3x faster than the best of the others.
_GEMV_DOT_SHAPES = [(16, 256, 4, 5), (16, 512, 4, 4), (32, 256, 4, 5), (32, 256, 4, 6), (32, 512, 4, 4),
                    (64, 128, 4, 5), (64, 256, 4, 4), (64, 512, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3)]


#: M <= 16 slices-kernel candidates (BLOCK_N, BLOCK_K, SLICES, warps, stages); BLOCK_M = 16. The best five per
#: problem on an H100, int8 4096x4096 and 14336x4096 (docs/PERFORMANCE.md, forty-first round): 16-row tiles with
#: 2-8 slices of 128-256 and rings of 3-8 stages (the default's tile among them); 32-row tiles at 14336x4096 only
#: (best at M = 8, by less than 1%); 64-128-row tiles and 16 slices never.
_GEMV_SLICES_SHAPES = [(16, 128, 2, 2, 5), (16, 256, 2, 2, 4), (16, 128, 4, 4, 5), (16, 256, 4, 4, 3),
                       (16, 128, 8, 4, 3), (16, 128, 4, 4, 7), (16, 128, 2, 2, 8), (32, 128, 4, 4, 5)]


def candidates(m: int, n: int, k: int, layout: str, act_size: int, sms: int, smem: int,
               tma: bool = False, bf16: bool = False) -> list[dict]:
    """The configs `autotune_*` benchmarks for one problem, pruned by shared memory and usefulness.
    `tma` (see `tma_eligible`): the M > 128 race includes the TMA kernels' configs; `bf16`: the
    activations are bf16 (it picks the default that joins the race)."""
    w_size = 1 if layout == "int8" else act_size
    cands: list[dict] = []
    if m <= 16:
        # (BLOCK_N, BLOCK_K, warps, stages): narrow N-tiles, deep K-tiles; streaming the weight is all.
        shapes = [(16, 256, 4, 5), (32, 128, 4, 5), (32, 256, 4, 5), (32, 512, 4, 3), (64, 128, 4, 5),
                  (64, 256, 4, 3), (64, 256, 8, 3), (128, 128, 4, 3),
                  # deeper rings (more weight bytes in flight per SM) for grids of about one program per SM
                  (32, 256, 4, 8), (32, 512, 4, 4), (64, 128, 4, 8), (64, 256, 4, 5), (64, 256, 8, 5)]
        for bn, bk, w, st in shapes:
            for split in _useful_splits(triton.cdiv(n, bn), k, bk, sms):
                cands.append(_config(16, bn, bk, split, w, st))
        if layout in ("nk", "int8"):  # the GEMV kernels: the weight tile is the dot's left operand
            for bn, bk, w, st in _GEMV_DOT_SHAPES:
                for split in _useful_splits(triton.cdiv(n, bn), k, bk, sms):
                    cands.append(_config(16, bn, bk, split, w, st, kernel=KERNEL_GEMV))
            for bn, bk, sl, w, st in _GEMV_SLICES_SHAPES:
                for split in _useful_splits(triton.cdiv(n, bn), k, bk * sl, sms):
                    cands.append(_config(16, bn, bk, split, w, st, kernel=KERNEL_GEMV_SLICES, slices=sl))
    elif m <= 128:
        shapes = [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                  (64, 128, 64, 4, 4), (64, 128, 64, 8, 3), (64, 256, 64, 8, 3)]
        for bm, bn, bk, w, st in shapes:
            if bm > 2 * triton.next_power_of_2(m):
                continue
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            for split in _useful_splits(tiles, k, bk, sms, max_split=4):
                cands.append(_config(bm, bn, bk, split, w, st))
    else:
        for bm, bn, bk, w, st in [(128, 256, 32, 8, 4), (128, 256, 64, 8, 4), (128, 256, 64, 8, 3),
                                  (256, 128, 64, 8, 3), (256, 128, 32, 8, 4), (128, 128, 64, 8, 4),
                                  (128, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                                  (64, 128, 64, 4, 4)]:
            cands.append(_config(bm, bn, bk, 1, w, st))
        if tma:
            for kernel, shapes in ((KERNEL_TMA, _TMA_SHAPES), (KERNEL_TMA_PERSISTENT, _TMA_PERSISTENT_SHAPES)):
                cands += [_config(bm, bn, bk, 1, w, st, kernel=kernel, subtile=sub) for bm, bn, bk, w, st, sub in shapes]
    # The default as this device runs it is always in the race: tuning can only improve on it.
    default = _device_default(m, n, k, layout, act_size, sms, smem, tma, bf16)
    if default not in cands:
        cands.insert(0, default)
    return [c for c in cands if _fits(c, act_size, w_size, smem)]


def _fits(cfg: dict, act_size: int, w_size: int, smem: int) -> bool:
    """Whether the pipelined x and W tiles of `cfg` (SLICES of each per stage) fit in shared memory."""
    per_slice = cfg["BLOCK_M"] * cfg["BLOCK_K"] * act_size + cfg["BLOCK_K"] * cfg["BLOCK_N"] * w_size
    return cfg["num_stages"] * cfg.get("SLICES", 1) * per_slice <= smem


def _decode_split(n_tiles: int, k: int, bk: int, sms: int, split: int = 1) -> int:
    """Split-K of a decode config: doubled while the N-tiles cannot fill half the GPU and every split keeps
    two K-tiles; a starting split halved while a split would get fewer than two K-tiles or the grid would
    pass two waves."""
    while n_tiles * split < sms // 2 and k >= 2 * bk * split * 2:
        split *= 2
    while split > 1 and (k < 2 * bk * split or n_tiles * split > 2 * sms):
        split //= 2
    return split


def _fitting(cfg: dict, act_size: int, w_size: int, smem: int) -> dict:
    """`cfg` with fewer pipeline stages while its tiles would not fit in `smem`: the defaults were measured
    on an H200 (227 KiB per block); an sm_86/89 GPU has 99 KiB."""
    while cfg["num_stages"] > 1 and not _fits(cfg, act_size, w_size, smem):
        cfg = dict(cfg, num_stages=cfg["num_stages"] - 1)
    return cfg


def _device_default(m: int, n: int, k: int, layout: str, act_size: int, sms: int, smem: int, tma: bool = False,
                    bf16: bool = False) -> dict:
    """`default_config` as this device runs it: fitted to its shared memory (`_fitting`)."""
    w_size = 1 if layout == "int8" else act_size
    return _fitting(default_config(m, n, k, layout, sms, tma, bf16), act_size, w_size, smem)


def default_config(m: int, n: int, k: int, layout: str, sms: int, tma: bool = False, bf16: bool = False) -> dict:
    """The config used when the table has no entry: a safe, reasonably fast pick per regime.
    `tma` (see `tma_eligible`): the problem may run on the TMA kernels; `bf16`: the activations are bf16."""
    if INTERPRETED:  # few, large programs: the interpreter pays per program, not per element
        return _config(16 if m <= 16 else 32, 32, 32, 1, 4, 2)
    if m <= 16 and layout != "kn":
        # H200 (tools/probe_triton_decode.py, M = 1 and 8, the best of ~40 candidates per problem):
        # - fp16/bf16 [N, K]: the GEMV kernel, 128x128 w8 s4 on 4096x12288 (26.1 us; the pointer kernel's
        #   old default 32.0, the CUDA module 27.7), 64x256 w4 s4 split 2 on 14336x4096.
        # - int8 with rows much longer than the output (K >= 2N) above N = 4096 (not measured there): the pointer
        #   kernel 64x256 w4 s3 split 4, as it won on 14336x4096 on an H200 before the slices kernel existed, fp16
        #   and bf16 activations (19.4 / 20.6 us; the GEMV kernel's best 21.2 / 27.1).
        # - int8 above N = 12288: the pointer kernel 64x256 w4 s3, fp16 and bf16 activations (4096x14336 fp16:
        #   18.9 us, the GEMV kernel 22.5, the CUDA module 17.3; H100 bf16 M = 1 / 8: 23.2 / 23.8 us, the CUDA
        #   module 22.9 / 22.9, where 32x256 s5 took 32.0 / 34.0: docs/PERFORMANCE.md, thirty-ninth round).
        # - int8 from N = 4097 to 12288, bf16 activations: the pointer kernel 32x256 w4 s5 (4096x12288: 17.8 us;
        #   the GEMV kernel 22.3, where converting the weight tile that feeds the dot from registers costs more
        #   in bf16).
        # - int8 from N = 4097 to 12288, fp16 activations: the GEMV kernel 32x256 w4 s5 (4096x12288: 16.6 us, the
        #   CUDA module 15.1; 8192x8192 1.03-1.07x of it).
        # - int8 up to N = 4096: the slices kernel 16x128, 4 slices, w4 s5, fp16 and bf16 activations (H100,
        #   4096x4096 M = 1 / 4 / 8, fp16: 8.8 / 8.9 / 8.8 us, where the GEMV kernel 32x256 took 8.7 / 9.3 / 9.2;
        #   bf16: 9.0 / 9.3 / 9.2, the pointer kernel 8.9 / 10.1 / 10.1; the CUDA module 7.8-8.1. 14336x4096
        #   M = 1 / 8, fp16: 22.6 / 23.2, the pointer kernel split 4 below 23.1 / 23.8; bf16: 22.8 / 23.5, it
        #   23.5 / 24.1; the CUDA module 21.6-22.2). On 4096x12288 and 4096x14336 its best lost to the defaults
        #   below by 7-17% (docs/PERFORMANCE.md, forty-first round). Not 2 slices and 2 warps at M = 1: on an
        #   H100 they took 4096x4096 in 8.5-8.6 us (fp16) / 8.7-8.8 (bf16) where 4 slices took 8.9 / 8.9-9.1, but
        #   on an H200 9.0-9.2 (bf16) / 8.4 (fp16) where 4 slices took 8.3 / 7.8 (forty-third round).
        if layout == "int8" and n <= 4096:
            tile = (16, 128, 4, 5, KERNEL_GEMV_SLICES, 1, 4)
        elif layout == "int8" and k >= 2 * n:
            tile = (64, 256, 4, 3, KERNEL_POINTER, 4, 1)
        elif layout == "int8" and n > 12288:
            tile = (64, 256, 4, 3, KERNEL_POINTER, 1, 1)
        elif layout == "int8" and bf16:
            tile = (32, 256, 4, 5, KERNEL_POINTER, 1, 1)
        elif layout == "int8":
            tile = (32, 256, 4, 5, KERNEL_GEMV, 1, 1)
        elif triton.cdiv(n, 128) >= sms // 2:
            tile = (128, 128, 8, 4, KERNEL_GEMV, 1, 1)
        else:
            tile = (64, 256, 4, 4, KERNEL_GEMV, 1, 1)
        bn, bk, warps, stages, kernel, split, slices = tile
        n_tiles = triton.cdiv(n, bn)
        # 16-bit [N, K] with a short K, whose 64-row tiles already fill a third of the GPU: not split. H100
        # (tools/probe_triton_decode.py, 2026-12-05), 4096x4096 M = 1 / 8, us: 64x256 s4 split 2 (the split
        # rule's pick) 13.9 / 14.1 fp16, 13.9 bf16; unsplit 13.6 / 13.4 fp16, 13.4 bf16 (the CUDA module 12.9
        # / 13.4). A long K (14336x4096 above) and fewer tiles keep the split.
        if layout == "nk" and k < 8192 and n_tiles >= sms // 3:
            return _config(16, bn, bk, 1, warps, stages, kernel=kernel)
        # A program of the slices kernel reads SLICES * BLOCK_K of each row per iteration: that is its K-tile.
        return _config(16, bn, bk, _decode_split(n_tiles, k, bk * slices, sms, split), warps, stages, kernel=kernel,
                       slices=slices)
    if m <= 16:
        # [K, N]. Measured on H100 (fp16, [N, K] then, M=1..16, N*K from 16M to 64M): BLOCK_N=32,
        # BLOCK_K=256, 5 stages, no split was within 3% of the best of 126 configs on every shape; split-K
        # lost whenever the N-tiles alone filled half the GPU. So split only when they do not. Rows of
        # BLOCK_N contiguous elements, so wider tiles once they fill the GPU (8192^2: 45.5 us with 64 vs
        # 53.2 with 32).
        # Where the 64-column tiles alone do not fill half the GPU but K is long, split them rather than
        # narrow them: H200, fp16 14336x4096 (tools/probe_triton_decode.py, 47 candidates, run 45), 64x256
        # w4 s3 split 2 took 31.0 / 31.6 us at M = 1 / 8 where 32x256 s5 unsplit took 33.9 / 33.3 (the CUDA
        # module 30.1 / 30.8): whole 128-byte rows, and a split-K reduce (a second launch, ~2 us) that K's
        # length pays for. Short K keeps 32-column tiles: there the reduce would cost what the rows save; and
        # 128-row K-tiles (H200 run 47, 4096x4096 fp16 and bf16, M = 1 / 8: 32x128 s5 11.6-11.7 us, 32x256 s5
        # 11.9-12.1, every split slower).
        if triton.cdiv(n, 64) >= sms // 2:
            return _config(16, 64, 256, 1, 4, 3)
        if k >= 8192:
            return _config(16, 64, 256, _decode_split(triton.cdiv(n, 64), k, 256, sms), 4, 3)
        return _config(16, 32, 128, _decode_split(triton.cdiv(n, 32), k, 128, sms), 4, 5)
    if m <= 128:  # H100, 4096^2, M=24/64/128: 64x64x128 tiles with split-K 2 were best or within 2%
        bm = 32 if m <= 32 else 64
        splits = _useful_splits(triton.cdiv(m, bm) * triton.cdiv(n, 64), k, 128, sms, max_split=2)
        return _config(bm, 64, 128, splits[-1], 4, 3)
    # H100, M=2048, K=4096, N=12288, best of 13 tile shapes per layout: [K, N] 128x256x32 (0.98x cuBLAS
    # fp16), [N, K] 256x128x64 (0.77x), int8 128x128x64 (int8->fp16 conversion in the main loop).
    # H200, same shape, [N, K] (tools/probe_triton_prefill.py, one autotune pass over every candidate): the
    # persistent TMA kernel at 128x256x64 w8 s3 0.998x cuBLAS fp16 (0.89x re-timed as the tuned op) and
    # 1.14x bf16; the one-program-per-tile TMA kernel's best 0.846x / 0.999x (128x128x64 w4 s4, the first
    # default: 0.79x / 0.94x); the pointer kernel's best 0.714x / 0.851x. [K, N] keeps the pointer kernel
    # (0.95-1.03x on H100) until the TMA kernels are measured there.
    if tma and layout == "nk":
        return _config(128, 256, 64, 1, 8, 3, kernel=KERNEL_TMA_PERSISTENT)
    if layout == "int8":
        return _config(128, 128, 64, 1, 8, 4)
    if m * n >= 2048 * 4096:
        return _config(256, 128, 64, 1, 8, 3) if layout == "nk" else _config(128, 256, 32, 1, 8, 4)
    return _config(128, 128, 64, 1, 8, 4)


_memo: dict[tuple, dict] = {}
_memo_generation = -1
_forced: dict | None = None
_warned_bad: set[str] = set()


def config_for(device: torch.device, dtype: torch.dtype, layout: str, m: int, n: int, k: int) -> dict:
    """The config a call runs with: forced (tests), else the table's, else `default_config`."""
    global _memo_generation
    if _forced is not None:
        return _forced
    gen = autotune.generation()
    if gen != _memo_generation:
        _memo.clear()
        _memo_generation = gen
    bucket = autotune.m_bucket(m)
    mk = (device.type, device.index, dtype, layout, bucket, n, k)
    cfg = _memo.get(mk)
    if cfg is None:
        key = tune_key(device, dtype, layout, bucket, n, k)
        info = _device_info(device.type, device.index)
        tma = tma_eligible(info, layout, dtype.itemsize, n, k)
        cfg = autotune.lookup(key)
        if cfg is not None and not (valid_config(cfg) and _fits(cfg, dtype.itemsize, 1 if layout == "int8" else dtype.itemsize,
                                                               info.smem)):
            if key.text not in _warned_bad:
                _warned_bad.add(key.text)
                logger.warning("dsinf: ignoring invalid Triton autotune entry %s: %s", key.text, cfg)
            cfg = None
        if cfg is None:
            cfg = _device_default(bucket, n, k, layout, dtype.itemsize, info.sms, info.smem, tma,
                                  dtype == torch.bfloat16)
        _memo[mk] = cfg = {**OPTIONAL_KEYS, **cfg}
    return cfg


@contextlib.contextmanager
def force_config(cfg: dict) -> Iterator[None]:
    """Run every matmul in the block with `cfg` (tests exercise each kernel path through it)."""
    global _forced
    if not valid_config(cfg):
        raise ValueError(f"invalid config {cfg}")
    prev, _forced = _forced, {**OPTIONAL_KEYS, **cfg}
    try:
        yield
    finally:
        _forced = prev


# ---------------------------------------------------------------------------------------------------
# Launches


#: Matmul launches per kernel (KERNEL_NAMES values) in this process: tests read them to know which
#: kernel ran. One dict increment per call.
_launch_counts = dict.fromkeys(KERNEL_NAMES.values(), 0)


def launch_counts() -> dict[str, int]:
    """How many matmuls each kernel ran in this process (a copy)."""
    return dict(_launch_counts)


def _tma_operands(x2: torch.Tensor, weight: torch.Tensor, n: int) -> bool:
    """Whether these tensors can be TMA descriptors (the per-call half of `tma_eligible`): a device with
    TMA, fp16/bf16/fp32 (fp32: interpreter only, see `decide`), and for x2, the weight and the [M, N]
    output, contiguous rows, 16-byte aligned base pointers and row strides. A view at an odd offset
    (e.g. a slice of a fused weight) fails here and runs on the pointer kernel."""
    size = x2.element_size()
    if weight.dtype != x2.dtype or size not in (2, 4) or (n * size) % 16:
        return False
    for t in (x2, weight):
        row, col = t.stride()
        if col != 1 or (row * size) % 16 or t.data_ptr() % 16:
            return False
    return _device_info(x2.device.type, x2.device.index).tma


def _launch_tma(cfg: dict, x2: torch.Tensor, weight: torch.Tensor, bias, weight_nk: bool, m: int, n: int, k: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    """x2 [M, K] @ W (+ bias) -> [M, N] on a TMA kernel; operands already passed `_tma_operands`.
    Building the three host descriptors costs about 2 us of CPU each (a dataclass with checks), small
    next to the launch, and paid only in the M > 128 regime where the kernel runs for 100s of us."""
    kernel = cfg["KERNEL"]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    subtile = cfg.get("EPILOGUE_SUBTILE", 0)
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    x_desc = TensorDescriptor(x2, x2.shape, x2.stride(), [bm, bk])
    w_desc = TensorDescriptor(weight, weight.shape, weight.stride(), [bn, bk] if weight_nk else [bk, bn])
    out_desc = TensorDescriptor(out, out.shape, out.stride(), [bm, bn // 2 if subtile else bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    args = (x_desc, w_desc, out_desc, bias if bias is not None else out, m, n, k)
    meta = dict(HAS_BIAS=bias is not None, W_NK=weight_nk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                GROUP_M=cfg["GROUP_M"], EPILOGUE_SUBTILE=bool(subtile),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if kernel == KERNEL_TMA_PERSISTENT:
        sms = _device_info(x2.device.type, x2.device.index).sms
        kernels._matmul_tma_kernel[(min(sms, tiles),)](*args, NUM_SMS=sms, **meta)
    else:
        kernels._matmul_tma_kernel[(tiles,)](*args, NUM_SMS=0, **meta)
    _launch_counts[KERNEL_NAMES[kernel]] += 1
    return out


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _pdl(device: torch.device, m: int) -> bool:
    """Whether a decode launch (M <= 16) uses programmatic dependent launch (`kernels` PDL): compiled kernels
    on an sm_90+ GPU, a triton with grid dependency control, and DSINF_TRITON_PDL. H200 (run 49): see
    docs/PERFORMANCE.md, tenth round. Larger M keeps the plain launch: no gain measured there."""
    return (m <= 16 and not INTERPRETED and kernels.HAS_GDC and device.type == "cuda" and _sm90(device.index)
            and knobs.get("DSINF_TRITON_PDL"))


def _launch_matmul(cfg: dict, x2: torch.Tensor, weight: torch.Tensor, bias, q_scale, weight_nk: bool,
                   m: int, n: int, k: int, out_dtype: torch.dtype, reduce: bool = True) -> torch.Tensor:
    """x2 [M, K] @ W -> [M, N] in out_dtype (bias added), or with reduce=False and SPLIT_K > 1 the
    fp32 partials [SPLIT_K, M, N] without bias (the QKV epilogue sums them).

    A TMA config (KERNEL 1, 2) whose operands do not qualify (`_tma_operands`), or a GEMV config
    (KERNEL 3, 4) on a [K, N] weight, runs with that problem's default without TMA (the pointer kernel, or
    for an [N, K] weight at decode sizes one of the GEMV kernels), as if the TMA kernels did not exist, but
    with the config's SPLIT_K: the caller reads SPLIT_K from the config it passed."""
    kernel = cfg.get("KERNEL", KERNEL_POINTER)
    if kernel in (KERNEL_TMA, KERNEL_TMA_PERSISTENT) and _tma_operands(x2, weight, n):
        return _launch_tma(cfg, x2, weight, bias, weight_nk, m, n, k, out_dtype)
    if kernel != KERNEL_POINTER and not (kernel in (KERNEL_GEMV, KERNEL_GEMV_SLICES) and weight_nk):
        layout = "int8" if weight.dtype == torch.int8 else ("nk" if weight_nk else "kn")
        info = _device_info(x2.device.type, x2.device.index)
        default = _device_default(autotune.m_bucket(m), n, k, layout, x2.element_size(), info.sms, info.smem,
                                  bf16=x2.dtype == torch.bfloat16)
        cfg = dict(default, SPLIT_K=cfg["SPLIT_K"])
        kernel = cfg["KERNEL"]  # tma=False: the pointer kernel, or a GEMV kernel for an [N, K] weight
    split = cfg["SPLIT_K"]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if weight_nk:
        stride_wk, stride_wn = weight.stride(1), weight.stride(0)
    else:
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    if split == 1:
        out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    else:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    w_int8 = weight.dtype == torch.int8
    rows_per_group = n // q_scale.shape[0] if w_int8 else 1
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    common = (x2, weight, bias if bias is not None else out, q_scale if w_int8 else out, out, m, n, k,
              x2.stride(0), x2.stride(1))
    pdl = _pdl(x2.device, m)
    launch = {"launch_pdl": True} if pdl else {}  # the interpreter takes no launch options
    slices = cfg.get("SLICES", 1)
    meta = dict(HAS_BIAS=bias is not None and split == 1, W_INT8=w_int8, EVEN_K=k % (bk * slices * split) == 0,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, ASM_I8=w_int8 and ASM_I8, PDL=pdl,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch)
    if kernel == KERNEL_GEMV:  # [N, K]: stride_wn, stride_wk
        kernels._gemv_kernel[grid](*common, stride_wn, stride_wk, rows_per_group, **meta)
    elif kernel == KERNEL_GEMV_SLICES:
        kernels._gemv_slices_kernel[grid](*common, stride_wn, stride_wk, rows_per_group, SLICES=slices, **meta)
    else:
        kernels._matmul_kernel[grid](*common, stride_wk, stride_wn, rows_per_group, W_NK=weight_nk,
                                     GROUP_M=cfg["GROUP_M"], **meta)
    _launch_counts[KERNEL_NAMES[kernel]] += 1
    if split == 1 or not reduce:
        return out
    result = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    kernels._splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
        out, bias if bias is not None else out, result, m * n, n,
        SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, PDL=pdl, num_warps=4, **launch)
    return result


def _launch_qkv(src: torch.Tensor, split: int, bias, shape: checks.MatmulShape, qkv: checks.QKVLayout,
                dtype: torch.dtype) -> list[torch.Tensor]:
    B, S, N = shape.B, shape.S, shape.N
    H, KV, D, rd = qkv.heads, qkv.kv_heads, qkv.head_dim, qkv.rotary_dim
    dev = src.device
    if qkv.gqa:
        q = torch.empty((B, H, S, D), dtype=dtype, device=dev)
        k = torch.empty((B, KV, S, D), dtype=dtype, device=dev)
        v = torch.empty((B, KV, S, D), dtype=dtype, device=dev)
        outs = [q, k, v]
    else:
        fused = torch.empty((3, B, H, S, D), dtype=dtype, device=dev)
        q, k, v = fused[0], fused[1], fused[2]
        outs = [fused]
    block_d = triton.next_power_of_2(D)
    block_s = min(triton.next_power_of_2(S), max(1, 2048 // block_d))
    # Heads per program: 1 for decode (parallelism; the trig is cheap there), up to 8 when there are
    # many rows, so the cos/sin tile is computed once for 8 heads.
    heads = 1 if B * S <= 32 else (4 if B * S <= 256 else 8)
    freq = -2.0 * math.log2(qkv.rope_theta) / rd if rd else 0.0  # f_i = 2^(i * freq), split in fp32 hi + lo
    freq_hi = struct.unpack("f", struct.pack("f", freq))[0]
    freq_lo = freq - freq_hi
    grid = (triton.cdiv(S, block_s), triton.cdiv(H + 2 * KV, heads), B)
    kernels._qkv_rope_kernel[grid](
        src, bias if bias is not None else src, q, k, v, S, N, H, KV, qkv.seq_offset, freq_hi, freq_lo,
        SPLIT=split, HAS_BIAS=bias is not None, D=D, ROT=rd, ROTATE_HALF=qkv.rotate_half,
        HEADS=heads, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    return outs


def _degenerate(shape: checks.MatmulShape) -> bool:
    return shape.M == 0 or shape.N == 0 or shape.K == 0


# ---------------------------------------------------------------------------------------------------
# Public ops


def linear_layer(input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode=False,
                 rope_theta=10000.0, rotary_dim=-1, rotate_half=False, num_kv=-1, seq_offset=0,
                 q_scale=None, *, op: str = "linear_layer") -> list[torch.Tensor]:
    """`dsinf.reference.linear_layer` on Triton kernels: matmul (+bias), then, with do_flash_attn,
    one epilogue kernel that splits q|k|v per head, applies RoPE and writes head-major outputs."""
    shape, qkv = checks.check_linear(op, input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode,
                                     rope_theta, rotary_dim, rotate_half, num_kv, seq_offset, q_scale)
    _check_backend(op, input, weight)
    if _degenerate(shape):  # nothing to launch; the reference defines the (empty or bias-only) result
        return reference.linear_layer(input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode,
                                      rope_theta, rotary_dim, rotate_half, num_kv, seq_offset, q_scale, op=op)
    M, N, K = shape.M, shape.N, shape.K
    x2 = input.reshape(M, K)
    b = bias if add_bias else None
    cfg = config_for(input.device, input.dtype, _layout(shape), M, N, K)
    src = _launch_matmul(cfg, x2, weight, b, q_scale, shape.weight_nk, M, N, K, input.dtype, reduce=qkv is None)
    if qkv is None:
        return [src.view(shape.B, shape.S, N)]
    split = cfg["SPLIT_K"]
    return _launch_qkv(src, split, b if split > 1 else None, shape, qkv, input.dtype)


def vector_matmul(input, weight, async_op=False, q_scale=None, q_int8=False, transposed_mode=False,
                  *, op: str = "vector_matmul") -> torch.Tensor:
    """`dsinf.reference.vector_matmul` on Triton kernels. `async_op` is accepted and ignored: the work
    runs on the caller's current stream."""
    shape = checks.check_vector_matmul(op, input, weight, async_op, q_scale, q_int8, transposed_mode)
    _check_backend(op, input, weight)
    if _degenerate(shape):
        return reference.vector_matmul(input, weight, async_op, q_scale, q_int8, transposed_mode, op=op)
    M, N, K = shape.M, shape.N, shape.K
    cfg = config_for(input.device, input.dtype, _layout(shape), M, N, K)
    out = _launch_matmul(cfg, input.reshape(M, K), weight, None, q_scale, shape.weight_nk, M, N, K, input.dtype)
    return out.view(shape.B, shape.S, N)


# ---------------------------------------------------------------------------------------------------
# Autotuning


#: Milliseconds added to a split-K candidate's time: its second launch (the reduction) costs a launch
#: gap on the GPU timeline of an eager model, which a CUDA graph (our benchmark) hides.
SPLIT_K_PENALTY_MS = 0.003


def _graph_bench(fn: Callable[[], object], reps: int = 20) -> float:
    """Median GPU milliseconds of one `fn()`: `reps` calls captured in one CUDA graph, replayed.

    A graph measures the kernels and not Python's launch cost, which for a decode-sized launch is
    larger than the GPU time (event timing of eager calls would rank configs by CPU noise). Replays
    run for 25 ms before timing, so every candidate is measured at the clocks of a busy GPU."""
    fn()  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    warm = 0
    while True:
        graph.replay()
        warm += 1
        end.record()
        end.synchronize()
        if warm >= 2 and start.elapsed_time(end) >= 25.0:
            break
    times = []
    for _ in range(9):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return sorted(times)[len(times) // 2]


def autotune_matmul(min_seqlen: int, max_seqlen: int, in_features: int, out_features: int, dtype: torch.dtype, *,
                    transposed_mode: bool = False, act_dtype: torch.dtype | None = None, groups: int = 1,
                    do_bench: Callable[[Callable[[], object]], float] | None = None, force: bool = False,
                    device: torch.device | str | None = None) -> dict[int, dict]:
    """Tune x[M, in_features] @ W[in_features -> out_features] for every M bucket in
    [min_seqlen, max_seqlen] and persist the winners. Returns {bucket: config}.

    `dtype` is the weight dtype as in `InferenceConfig.dtype`: fp16/bf16 (activations of the same
    dtype), or int8 (weight-only; activations `act_dtype`, default fp16; int8 weights are [N, K]).
    Buckets already in the table are not re-benchmarked unless `force`. `do_bench(fn) -> ms` times
    one launch closure (default: `_graph_bench`); inject it to count or fake timings. Successive
    calls of the closure cycle through copies of the weight that together exceed 3x the L2, so a
    decode-sized weight is timed as read from memory, as in a model, not from a warm L2.
    """
    int8 = dtype == torch.int8
    act = (act_dtype or torch.float16) if int8 else dtype
    if device is None:
        device = torch.device("cpu") if INTERPRETED else torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    ok, reason = _decide(dtype, device.type, interpreter=INTERPRETED, act_dtype=act)
    if not ok:
        raise ValueError(f"autotune: {reason}")
    if do_bench is None and device.type != "cuda":
        raise ValueError("autotune: timing needs a CUDA device (pass do_bench= to run elsewhere)")
    K, N = int(in_features), int(out_features)
    layout = "int8" if int8 else ("nk" if transposed_mode else "kn")
    gen = torch.Generator(device="cpu").manual_seed(0)
    if int8:
        weight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen).to(device)
        q_scale = (torch.rand(groups, generator=gen) * 0.01 + 0.001).to(device)
    else:
        wshape = (N, K) if transposed_mode else (K, N)
        weight = (torch.randn(wshape, generator=gen) / math.sqrt(K)).to(device=device, dtype=act)
        q_scale = None
    info = _device_info(device.type, device.index)
    copies = max(1, min(64, math.ceil(3 * info.l2 / (weight.numel() * weight.element_size()))))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    if do_bench is None:
        do_bench = functools.partial(_graph_bench, reps=copies * math.ceil(20 / copies))
    chosen: dict[int, dict] = {}
    for bucket in autotune.buckets_between(min_seqlen, max_seqlen):
        x2 = torch.randn((bucket, K), generator=gen).to(device=device, dtype=act)
        key = tune_key(device, act, layout, bucket, N, K)
        cands = candidates(bucket, N, K, layout, act.itemsize, info.sms, info.smem,
                           tma_eligible(info, layout, act.itemsize, N, K), act == torch.bfloat16)

        def bench(cfg, x2=x2):
            ws = itertools.cycle(weights)
            ms = do_bench(lambda: _launch_matmul(cfg, x2, next(ws), None, q_scale, int8 or transposed_mode,
                                                 x2.shape[0], N, K, act))
            return ms + (SPLIT_K_PENALTY_MS if cfg["SPLIT_K"] > 1 else 0.0)

        chosen[bucket] = autotune.tune(key, cands, bench, force=force)
    return chosen


def autotune_linear(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype: torch.dtype, *,
                    out_features: int | None = None, **kwargs) -> dict[int, dict]:
    """LinearOp's warm-up: the fused QKV projection [hidden] -> [3 * hidden] (DeepSpeed's shape), or
    `out_features` (e.g. (H + 2*KV) * D for GQA). Keywords as `autotune_matmul`."""
    return autotune_matmul(min_seqlen, max_seqlen, hidden_size, out_features or 3 * hidden_size, dtype, **kwargs)


def autotune_vector_matmul(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype: torch.dtype, *,
                           out_features: int | None = None, **kwargs) -> dict[int, dict]:
    """VectorMatMulOp's warm-up: [hidden] -> [hidden] (or `out_features`). Keywords as `autotune_matmul`."""
    return autotune_matmul(min_seqlen, max_seqlen, hidden_size, out_features or hidden_size, dtype, **kwargs)
