"""`Env`: what an ops section shares - the device, the compiled module, dsinf.triton, the cache size
and a pool of rotating buffers (so a weight set is several times the last-level cache)."""
from __future__ import annotations

import math
from typing import Any, Callable

from . import adapter
from .cases import Case, copies_for
from .timing import cpu_l3_bytes

def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[name]


class Unavailable:
    """An implementation that cannot run here, and why."""

    def __init__(self, reason: str):
        self.reason = reason


class Env:
    """`kind` ("cpu"/"cuda") picks the module variant, cache model and Triton policy; `device` is where
    tensors live (the same, except when a test runs the CUDA plan's logic on CPU tensors)."""

    def __init__(self, kind: str, device: str | None = None):
        import torch

        self.torch = torch
        self.kind = kind
        self.device = device or kind
        self.module = None
        self.module_why = "not loaded"
        self.triton = None
        self.triton_why = "not tried"
        self.capability: tuple[int, int] | None = None
        self.pool: dict[Any, Any] = {}
        if kind == "cuda" and self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            self.capability = (props.major, props.minor)
            self.cache_bytes = int(getattr(props, "L2_cache_size", 0) or 50 << 20)
        else:
            self.cache_bytes = cpu_l3_bytes()
        self.cache_factor, self.min_copies, self.max_copies = (4.0, 2, 16) if kind == "cuda" else (2.0, 1, 8)

    # --- backends ---
    def load_module(self, failed_cold_build: str | None = None) -> None:
        if failed_cold_build and adapter.cached_build_missing(self.kind):
            # the same build would fail again here (and cost the time once more)
            self.module_why = f"cold build failed in this run ({failed_cold_build})"
            return
        self.module, self.module_why = adapter.load_module(self.kind)

    def load_triton(self, enabled: bool) -> None:
        if not enabled:
            self.triton_why = "disabled (--no-triton)"
        elif self.kind != "cuda":
            self.triton_why = "Triton kernels serve CUDA tensors"
        else:
            self.triton, self.triton_why = adapter.load_triton()

    def ours(self, fname: str):
        """The compiled function, or Unavailable."""
        if self.module is None:
            return Unavailable(f"compiled module: {self.module_why}")
        f = adapter.module_function(self.module, fname, self.device)
        return Unavailable(f) if isinstance(f, str) else f

    def triton_for(self, case: Case):
        if self.triton is None:
            return Unavailable(f"triton: {self.triton_why}")
        wdtype = torch_dtype("int8" if case.layout == "int8" else case.dtype)
        ok, why = adapter.triton_supports(self.triton, wdtype, self.device, self.capability)
        return self.triton if ok else Unavailable(f"triton: {why}")

    def copies(self, nbytes: int) -> int:
        return copies_for(nbytes, self.cache_bytes, self.cache_factor, self.min_copies, self.max_copies)

    # --- data ---
    def cached(self, key, make: Callable[[], Any]):
        if key not in self.pool:
            self.pool[key] = make()
        return self.pool[key]

    def clear(self) -> None:
        self.pool.clear()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def rotating(self, t) -> list:
        """t and enough clones that the set is several times the cache."""
        return [t] + [t.clone() for _ in range(self.copies(t.numel() * t.element_size()) - 1)]

    def base_weight(self, K: int, N: int):
        """fp32 [K, N] weight, N(0, 1/K) so outputs are O(1)."""
        return self.cached(("w32", K, N), lambda: self.torch.randn(K, N, device=self.device) / math.sqrt(K))

    def weights(self, K: int, N: int, dtype: str, layout: str) -> list:
        """Rotating copies of the float weight in `layout` ("kn"/"nk") and `dtype`."""
        def make():
            w = self.base_weight(K, N).to(torch_dtype(dtype))
            return self.rotating((w if layout == "kn" else w.t()).contiguous())
        return self.cached(("w", K, N, dtype, layout), make)

    def int8_weights(self, K: int, N: int) -> list:
        """Rotating copies of the int8 [N, K] per-channel quantized weight; each has `.scale`."""
        def make():
            from dsinf import quantize_int8

            q = quantize_int8(self.base_weight(K, N), None, transposed_mode=False)
            copies = [q]
            for _ in range(self.copies(q.numel()) - 1):
                c = q.clone()
                c.scale = q.scale.clone()
                copies.append(c)
            return copies
        return self.cached(("i8", K, N), make)

    def dequantized(self, K: int, N: int, dtype: str, layout: str) -> list:
        """Float copies of what the int8 weight stands for (torch's side of the int8 comparison)."""
        def make():
            q = self.int8_weights(K, N)[0]
            w = (q.to(self.torch.float32) * q.scale[:, None]).to(torch_dtype(dtype))  # [N, K]
            return self.rotating((w.t() if layout == "kn" else w).contiguous())
        return self.cached(("deq", K, N, dtype, layout), make)

    def inputs(self, case: Case, copies: int, width: int | None = None) -> list:
        torch = self.torch
        return [torch.randn(case.B, case.S, width or case.K, device=self.device).to(torch_dtype(case.dtype))
                for _ in range(copies)]

    def vector(self, N: int, dtype: str, key: str = "b"):
        """A random [N] vector (a bias, a norm's gamma)."""
        return self.cached((key, N, dtype),
                           lambda: self.torch.randn(N, device=self.device).to(torch_dtype(dtype)))
