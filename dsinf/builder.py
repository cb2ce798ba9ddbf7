"""InferenceBuilder: the transformer-inference module (every op spec's functions: `linear_layer_*`, ...).

It lives with the ops, not in op_builder (which is generic and imports nothing from dsinf): op_builder's
registry names it as a "module:Class" string and imports it on first use, so
`from op_builder import InferenceBuilder` still works. This module imports no torch at import time.

Two variants, built and cached independently, loadable side by side in one process:
- `cpu`:  csrc/inference/cpu/*.cpp + binding/cpu_binding*.cpp, g++ only; any machine with a compiler.
- `cuda`: csrc/inference/cuda/*.cu + binding/cuda_binding*.cpp, nvcc; machines with CUDA torch + nvcc.

`InferenceBuilder().load()` loads the variants this machine can use (cpu, plus cuda when a GPU is
visible; the missing ones are built at once) and returns one `InferenceModule`; `load("cpu")` /
`load("cuda")` loads just one. The module's functions are the `torch.ops.dsinf.*` custom ops: the
dispatcher routes CPU tensors to the CPU kernels and CUDA tensors to the CUDA ones.
"""
from __future__ import annotations

import hashlib
from typing import Any

from op_builder import knobs
from op_builder.archs import Arch, covers, nvcc_gencode_flags, parse_arch_list
from op_builder.build import BuildSpec
from op_builder.builder import OpBuilder, csrc_root, loaded_variants
from op_builder.compat import BuildDecision, cpu_compatible, cuda_compatible
from op_builder.errors import IncompatibleError
from op_builder.system import ISA_RANK, isa_flags

# Portable baseline of prebuilt CPU binaries: x86-64-v3 (AVX2/FMA/F16C, every x86 server since
# 2013). The manifest records it and load() refuses it, with the reason, on an older CPU.
PORTABLE_ISA = "avx2"


def host_native_bf16_gemm(cpu) -> bool:
    """Whether the CPU module runs bf16 activations past its GEMV on torch's native bf16 GEMM on this host: the
    rule of cpu_binding_ops.cpp's host_has_native_bf16 (read there from CPUID at run time, whatever ISA level the
    binary was built for), for the report; tests/test_routes.py checks that the two agree."""
    import torch

    return "avx512_bf16" in cpu.flags and torch.backends.mkldnn.is_available()


def host_amx_bf16(cpu) -> bool:
    """Whether the CPU module's bf16 crossovers take the AMX rule on this host (torch's native bf16 GEMM on AMX
    tiles: [N, K] weights leave the GEMV at M > 4, int8 at M > 8, or at M > 16 where they run on our own AMX
    kernel, which keeps them to M = 256): the rule of cpu_binding_ops.cpp's host_has_amx_bf16 (read there from
    CPUID and XCR0, and the OS's grant of the tile state, which only the module can ask: where the OS refuses it
    the two differ), for the report; tests/test_routes.py checks that the two agree."""
    return {"amx_bf16", "amx_tile"} <= set(cpu.flags) and host_native_bf16_gemm(cpu)


def host_onednn_fp32_gemm(cpu) -> bool:
    """Whether the CPU module runs fp32 past its GEMV on oneDNN's GEMM rather than MKL's on this host: the rule
    of cpu_binding_ops.cpp's host_prefers_onednn_fp32 (an AMD CPU, where MKL's code path is not its best; read
    there from CPUID), for the report; tests/test_routes.py checks that the two agree."""
    import torch

    return "AMD" in cpu.brand.upper() and cpu.arch in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()


def host_kn_gemm(cpu, isa: str) -> bool:
    """Whether the CPU module, built for `isa`, runs float [K, N] weights past its GEMV on its own GEMM (N >= 1024:
    up to M = 128, and to 512 for N >= 2K) on this host: the rule of cpu_binding_ops.cpp's kn_gemm_host (an AVX-512
    build where fp32 runs on oneDNN, which reads a [K, N] weight below its [N, K] speed), for the report, which
    states it of the JIT build (prebuilt_note says where an installed portable one keeps oneDNN);
    tests/test_routes.py checks that the two agree."""
    return isa.startswith("avx512") and host_onednn_fp32_gemm(cpu)


# No -std flag: torch.utils.cpp_extension passes the standard its own headers need (C++20 in 2.13).
# -fopenmp: at::parallel_for is an inline template that parallelises only when the extension itself is
# compiled with OpenMP; linking libgomp.so.1 resolves to the copy torch already loaded (one runtime).
# Warnings on for our host sources (the CPU module and the CUDA binding): tests fail on any
# (test_cpu_module, test_cuda_compile).
_WARNINGS = ("-Wall", "-Wno-unknown-pragmas")
_CPU_FLAGS = ("-O3", "-DNDEBUG", "-fno-math-errno", "-fopenmp") + _WARNINGS
_CPU_LDFLAGS = ("-fopenmp",)
_NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-DNDEBUG",
               # torch adds -D__CUDA_NO_HALF*__ for its own headers; our kernels want the operators.
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
               "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
               "-U__CUDA_NO_BFLOAT162_OPERATORS__")



def _split_compile(nvcc, cpu_count: int) -> tuple[tuple[str, ...], int]:
    """(nvcc flags, threads one nvcc job may then run). nvcc (NVVM) and ptxas optimise the kernels of one
    translation unit on several threads. The build's wall time on a many-core machine is its slowest
    translation unit, a .cu with dozens of template kernels (mlp_gemm.cu: 45); each kernel is still optimised
    whole, so the SASS does not change (every kernel's code byte-identical with and without, nvcc 13.0,
    sm_90a: tools/cuda_build_times.py --check-sass). ptxas takes the option from CUDA 12.8 on (older toolkits
    build as before). The thread count tells a concurrent build how much this one crowds the cores
    (`op_builder.build.niceness_increments`)."""
    threads = knobs.get("DSINF_NVCC_SPLIT_COMPILE")
    if threads == 1 or nvcc is None or nvcc.version < (12, 8):
        return (), 1
    n = threads or 0  # 0: as many threads as CPUs
    return (f"--split-compile={n}", "-Xptxas", f"--split-compile={n}"), n or max(1, cpu_count)


class InferenceBuilder(OpBuilder):
    NAME = "transformer_inference"
    BUILD_VAR = "DS_BUILD_TRANSFORMER_INFERENCE"
    VARIANTS = ("cpu", "cuda")

    # ---- sources ------------------------------------------------------------------------------
    def _sources(self, variant: str) -> tuple[list[str], list[str]]:
        root = csrc_root() / "inference"
        if variant == "cpu":
            kernels = sorted((root / "cpu").glob("*.cpp"))
        else:
            kernels = sorted((root / "cuda").glob("*.cu"))
        # The binding's files (ATen + torch/library.h headers) are the slowest compiles: first, so ninja starts
        # them first. Both bindings keep their op bodies apart from their registrations, so only the
        # registrations parse torch/library.h (cuda_binding.h, cpu_ops.h say why): CUDA in four files, CPU in two.
        bindings = sorted((root / "binding").glob(f"{variant}_binding*.cpp"))
        return [str(p) for p in [*bindings, *kernels]], [str(root / "include"), str(root / "binding")]

    # ---- compatibility ------------------------------------------------------------------------
    def compatible(self, variant: str) -> BuildDecision:
        if variant == "cpu":
            decision = cpu_compatible(self.system)
            if not decision.ok:  # no torch, ninja or compiler: nothing to say about how it would run
                return decision
            notes_amx: list[str] = []
            gemm = ("torch's native bf16 GEMM (this CPU has avx512_bf16)" if host_native_bf16_gemm(self.system.cpu)
                    else "the fp32 GEMM on widened weights (no avx512_bf16 here)")
            if host_amx_bf16(self.system.cpu):
                gemm += ("; on AMX tiles here, so [N, K] weights leave the GEMV sooner (M > 4; torch's GEMM ran up "
                         "to 1.3x faster than the GEMV at M = 8), and int8 at M > 8 unless our AMX kernel takes them")
                if self._cpu_isa(portable=False)[0] == "avx512_bf16":
                    notes_amx = ["int8 weights with bf16 activations at M = 2..256: our kernel on AMX tiles (the "
                                 "vdpbf16ps GEMV is bound by its multiply-adds there, and dequantize + GEMM by the "
                                 "weight's bf16 copy)"]
            fp32 = ("oneDNN's (an AMD CPU: MKL's AMD code path ran 1.1-2.6x slower)"
                    if host_onednn_fp32_gemm(self.system.cpu) else "MKL's")
            notes = [*decision.notes, f"bf16 past the GEMV: {gemm}", *notes_amx, f"fp32 GEMM past the GEMV: {fp32}"]
            if host_kn_gemm(self.system.cpu, self._cpu_isa(portable=False)[0]):
                notes.append("float [K, N] weights past the GEMV: our GEMM (an AVX-512 build) for N >= 1024 up to "
                             "M = 128, and to 512 for N >= 2K (oneDNN's ran 0.66-0.94x of its [N, K] speed on them)")
            return BuildDecision.of(list(decision.reasons), notes)
        if variant == "cuda":
            return cuda_compatible(self.system, knobs.get("TORCH_CUDA_ARCH_LIST"))[0]
        raise ValueError(f"unknown variant {variant!r}; {self.NAME} has {self.VARIANTS}")

    def _archs(self, portable: bool) -> tuple[Arch, ...]:
        decision, resolution = cuda_compatible(self.system, knobs.get("TORCH_CUDA_ARCH_LIST"))
        if not decision.ok:
            raise IncompatibleError(f"{self.NAME}[cuda]", decision.reasons)
        archs = resolution.archs
        if portable and resolution.source == "visible GPUs":
            # A shipped binary should not be limited to the build host's GPU: add the nvcc default.
            from op_builder.archs import resolve_archs
            from op_builder.system import System

            no_gpu = System(probe=False, nvcc=self.system.nvcc, gpus="portable build")
            archs = tuple(sorted(set(archs) | set(resolve_archs(no_gpu, None).archs)))
        return archs

    # ---- build --------------------------------------------------------------------------------
    def _cpu_isa(self, portable: bool) -> tuple[str, tuple[str, ...]]:
        cpu = self.system.cpu
        x86 = cpu.arch in ("x86_64", "AMD64", "amd64")
        if portable:
            return (PORTABLE_ISA, isa_flags(PORTABLE_ISA)) if x86 else ("baseline", ())
        wanted = knobs.get("DSINF_CPU_ISA")
        if wanted != "auto":
            # A chosen level (the tests build every level the host runs): exactly its -m flags, never
            # -march=native, which would enable everything this CPU has.
            if ISA_RANK[wanted] > ISA_RANK[cpu.isa]:
                runs = [level for level, rank in ISA_RANK.items() if rank <= ISA_RANK[cpu.isa]]
                raise knobs.KnobError(f"DSINF_CPU_ISA={wanted}: this CPU runs only {', '.join(runs)}")
            return wanted, isa_flags(wanted)
        if not x86:
            return "baseline", ()
        if knobs.get("DSINF_NATIVE_ISA"):
            return cpu.isa, ("-march=native",)
        return cpu.isa, isa_flags(cpu.isa)

    @staticmethod
    def _kernels(bf16: bool = True) -> tuple[str, ...]:
        """Every `dsinf::` function the binary must register (op_builder rejects a library that does not):
        all the specs' functions, without the `_bf16` ones when the build has no bf16 kernels."""
        import torch

        from .library import qualified
        from .ops import spec as op_spec

        return tuple(qualified(name) for s in op_spec.specs().values() for name, dtype in s.functions().items()
                     if bf16 or dtype is not torch.bfloat16)

    def spec(self, variant: str, *, portable: bool = False, archs: tuple[Arch, ...] | None = None) -> BuildSpec:
        """`archs`: CUDA targets to build for instead of the resolved ones (tools/cuda_build_times.py uses it
        to time the compiles on a machine without a CUDA torch)."""
        sources, includes = self._sources(variant)
        library_name = f"{self.NAME}_{variant}"
        if variant == "cpu":
            isa, isa_cflags = self._cpu_isa(portable)
            return BuildSpec(op=self.NAME, variant=variant, library_name=library_name, sources=tuple(sources),
                             include_dirs=tuple(includes), cflags=_CPU_FLAGS + isa_cflags, ldflags=_CPU_LDFLAGS,
                             pre_load="dsinf.library:define", describe=f"for {isa}", kernels=self._kernels(),
                             manifest_extra={"isa": isa, "native": "-march=native" in isa_cflags})
        archs = archs or self._archs(portable)
        bf16 = all(a.major >= 8 for a in archs)
        # sm_90a code (warpgroup MMA) is built: the int8 GEMM takes it on a compute-capability-9.0 device.
        sm90a = bf16 and any(a.capability == (9, 0) and a.suffix == "a" for a in archs)
        defines = ("-DDSINF_CUDA_BF16",) * bf16 + ("-DDSINF_CUDA_SM90A",) * sm90a
        jobs_threads = ("--threads=1",)  # parallelism comes from ninja jobs; nvcc threads multiply memory
        split, split_threads = _split_compile(self.system.nvcc, self.system.cpu_count)
        return BuildSpec(op=self.NAME, variant=variant, library_name=library_name, sources=tuple(sources),
                         include_dirs=tuple(includes), cflags=("-O3", "-DNDEBUG") + _WARNINGS + defines,
                         cuda_cflags=(_NVCC_FLAGS + defines + jobs_threads + split + tuple(nvcc_gencode_flags(archs))),
                         threads_per_job=split_threads, with_cuda=True, pre_load="dsinf.library:define",
                         kernels=self._kernels(bf16),
                         describe="for " + " ".join(f"sm_{a.sm}" for a in archs),
                         manifest_extra={"archs": [str(a) for a in archs], "bf16": bf16})

    def key_fields(self, variant: str, spec: BuildSpec) -> dict[str, Any]:
        fields = super().key_fields(variant, spec)
        s = self.system
        if variant == "cpu":
            fields["isa"] = spec.manifest_extra["isa"]
            if spec.manifest_extra.get("native"):  # -march=native: the binary is this CPU model's
                fields["cpu"] = hashlib.sha256((s.cpu.brand + " " + " ".join(sorted(s.cpu.flags))).encode()
                                               ).hexdigest()[:16]
        else:
            fields["torch_cuda"] = s.torch_cuda
            fields["nvcc"] = s.nvcc.version_str if s.nvcc else None
            fields["cuda_toolchain"] = s.cuda_toolchain  # the nvcc, host compiler and nvcc flags that run
            fields["archs"] = spec.manifest_extra["archs"]
        return fields

    def prebuilt_note(self, variant: str, manifest: dict[str, Any]) -> str | None:
        """An installed CPU binary targets the portable level: on a CPU that runs more, a JIT build is faster."""
        if variant != "cpu" or knobs.get("DSINF_NO_PREBUILT"):
            return None
        isa, here = manifest.get("isa", "baseline"), self._cpu_isa(portable=False)[0]  # what a JIT build targets
        if ISA_RANK.get(isa, 0) >= ISA_RANK.get(here, 0):
            return None
        kn = (" (and takes float [K, N] weights to our GEMM, which this one leaves to oneDNN)"
              if host_kn_gemm(self.system.cpu, here) and not host_kn_gemm(self.system.cpu, isa) else "")
        return (f"the installed binary is built for {isa} (portable); a JIT build here targets {here}{kn}: "
                f"DSINF_NO_PREBUILT=1 builds (once) and loads one")

    def runtime_problems(self, variant: str, manifest: dict[str, Any]) -> list[str]:
        problems = super().runtime_problems(variant, manifest)
        s = self.system
        if variant == "cpu":
            isa = manifest.get("isa", "baseline")
            if manifest.get("native"):
                problems.append("built with -march=native for another machine")
            elif ISA_RANK.get(isa, 99) > ISA_RANK[s.cpu.isa]:
                problems.append(f"built for {isa} but this CPU supports only {s.cpu.isa}")
        else:
            fields = manifest.get("key_fields", {})
            if fields.get("torch_cuda") != s.torch_cuda:
                problems.append(f"built for CUDA {fields.get('torch_cuda')}, torch has CUDA {s.torch_cuda}")
            built = parse_arch_list(";".join(manifest.get("archs", []))) if manifest.get("archs") else ()
            for gpu in s.gpu_list:
                if not covers(built, gpu.capability):
                    problems.append(f"built for {' '.join(manifest.get('archs', []))}, which cannot run on "
                                    f"GPU {gpu.index} ({gpu.name}, {gpu.capability[0]}.{gpu.capability[1]})")
        return problems

    def pre_load(self) -> None:
        from . import library

        library.define()

    def post_load(self, variant: str) -> None:
        """Push this device's persisted routes (dsinf.routes) into the module. A problem is a warning: the
        module runs on its compiled crossovers."""
        from . import routes

        try:
            routes.apply(variant)
        except knobs.KnobError:
            raise  # a misconfigured DSINF_ROUTES is the user's to fix
        except Exception as exc:  # noqa: BLE001 - routes are an optimisation, never a reason not to load
            import logging

            logging.getLogger("dsinf").warning("dsinf: the measured routes could not be applied to the %s module "
                                               "(%s: %s); it runs on its compiled crossovers", variant,
                                               type(exc).__name__, exc)

    def measured(self) -> list[dict[str, Any]]:
        """The route tables (dsinf.routes: which M run on which kernel, per shape) and the Triton autotune
        table (dsinf.triton.autotune: the fastest config per problem), each per device/version/build."""
        from . import routes
        from .triton import autotune

        route_path, tune_path = routes.table_path(), autotune.table_path()  # both readers never raise
        return [{"what": "routes", "path": str(route_path), "list": "python -m dsinf.routes",
                 "tables": {device: len(t) for device, t in routes.read_tables(route_path).items()}},
                {"what": "triton autotune", "path": str(tune_path), "list": None,
                 "tables": autotune.summary(tune_path)}]

    def sanity_check(self, variant: str) -> str:
        """Run each compiled function on its spec's samples against the spec's reference; raise on mismatch."""
        import torch

        from .ops import spec as op_spec

        module = self.load(variant)
        device = "cuda" if variant == "cuda" else "cpu"
        gen = torch.Generator().manual_seed(0)
        checked = []
        for name in module.functions(variant):
            spec = op_spec.spec_of_function(name)
            act_dtype = spec.functions()[name]
            for dtype in [act_dtype] if act_dtype is not None else [torch.float32, torch.float16]:
                for args in spec.samples(device, dtype, gen):
                    got, want = getattr(module, name)(*args), spec.reference(*args)
                    for g, w in zip(_tensors(got), _tensors(want)):
                        err = ((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
                        if not err < (1e-4 if dtype == torch.float32 else 2e-2):
                            raise AssertionError(f"{name} on {device}: relative error {err:.2e} vs the reference")
            checked.append(name)
        return f"{len(checked)} functions match the reference ({', '.join(checked)})"

    # ---- the user-facing load -----------------------------------------------------------------
    def wanted_variants(self) -> list[str]:
        """Variants `load()` with no argument loads: cpu, plus cuda when a GPU is visible."""
        return ["cpu", "cuda"] if self.system.gpu_list else ["cpu"]

    def load(self, device_type: str | None = None, verbose: bool = False) -> "InferenceModule":
        """Load (building first if needed) the module for `device_type` ('cpu', 'cuda' or None = all
        this machine can use). `verbose` is accepted for DeepSpeed compatibility; progress goes to
        logging."""
        variants = self.wanted_variants() if device_type is None else [device_type]
        for variant in variants:
            if variant not in self.VARIANTS:
                raise ValueError(f"unknown device type {variant!r}; {self.NAME} has {self.VARIANTS}")
        self.load_variants(variants)  # the builds they need run at once
        return InferenceModule(self)


def _tensors(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


class InferenceModule:
    """What `InferenceBuilder().load()` returns: `mod.linear_layer_fp16(...)` etc.

    Attributes are the `torch.ops.dsinf.*` ops (DeepSpeed's positional signatures), one per function of
    the op specs. An attribute exists when at least one loaded variant compiled that function; it is
    looked up once and then set on the instance, so `mod.vector_matmul_fp32(...)` per call costs what
    the bound op does. `has(name, device_type)` asks for one device.
    """

    def __init__(self, builder: InferenceBuilder):
        self._builder = builder

    @property
    def variants(self) -> dict[str, Any]:
        return {v: lv for (op, v), lv in loaded_variants().items() if op == self._builder.NAME}

    def has(self, name: str, device_type: str) -> bool:
        from . import library

        return device_type in self.variants and name in library.functions() and library.has_kernel(name, device_type)

    def functions(self, device_type: str) -> list[str]:
        from . import library

        return [f for f in library.functions() if self.has(f, device_type)]

    def __getattr__(self, name: str):
        from . import library

        if name.startswith("_") or name not in library.functions():
            raise AttributeError(name)
        if not any(self.has(name, d) for d in self.variants):
            raise AttributeError(f"{name} is not compiled in the loaded variants ({', '.join(self.variants)})")
        import torch

        op = getattr(torch.ops.dsinf, name).default  # the overload: no packet resolution per call
        setattr(self, name, op)  # the next lookup is a plain instance attribute
        return op

    def __dir__(self):
        return sorted(set(super().__dir__()) | {f for d in self.variants for f in self.functions(d)})
