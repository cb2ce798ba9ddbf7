"""OpBuilder: what an op is built from, and `load()` = prebuilt | cached JIT | build now.

A builder declares data (sources, include dirs, variants, requirements); everything with side
effects lives in `build.py` (the transaction) and `cache.py` (keys, manifests). The same flag list
feeds the JIT build and the `DS_BUILD_OPS=1` install (DeepSpeed assembled them twice, differently).

Per variant and process, `load_variant` runs at most once (memoised, thread-safe):
1. a binary installed with the package (`op_builder/prebuilt/<op>-<variant>/`) whose manifest matches
   this torch / Python / GPU / CPU — else it says why and goes on;
2. the JIT cache entry for this machine's key, if complete and intact;
3. a build now (under the cross-process lock), then load.

`load_variants` loads several: the builds they need run at once (one thread each, every build in its
own worker process and under its own lock, the job budget split between them, one with threaded compile
jobs a step lower in priority beside one without), then the libraries load one after the other in the
calling thread.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cache, knobs, trust
from .build import (BuildSpec, SourcesChanged, build_or_wait, dispatch_key, failed_dir, job_shares,
                    missing_kernels, niceness_increments)
from .compat import Decision
from .errors import BuildError, IncompatibleError, OpBuilderError
from .system import System, current_system

log = logging.getLogger("op_builder")

PACKAGE_DIR = Path(__file__).resolve().parent
PREBUILT_DIR = PACKAGE_DIR / "prebuilt"
SOURCE_CHANGE_RETRIES = 2  # builds discarded because their sources changed meanwhile, before giving up


def csrc_root() -> Path:
    """Kernel sources: `op_builder/csrc` in an installed package, `<repo>/csrc` in a checkout."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kernel sources not found next to {PACKAGE_DIR} (looked for csrc/)")


@dataclass(frozen=True)
class LoadedVariant:
    op: str
    variant: str
    path: Path  # the .so that was loaded
    how: str  # "prebuilt", "cached" or "built"
    manifest: dict[str, Any]
    seconds: float  # wall time of load_variant


_loaded: dict[tuple[str, str], LoadedVariant] = {}
# Builds that failed in this process, by (op, variant, key digest): asked again (every op instance that
# resolves its backend asks: an injected model has dozens), the same sources and flags fail the same way, so
# the error is raised again at once instead of after another full build. An edited source or flag is another
# key: built again. A transient failure (the time limit, the OOM killer, a full disk) is built again once
# DSINF_BUILD_TIME_LIMIT changed or TRANSIENT_RETRY_S passed, not by every op instance of the same burst.
_failed: dict[tuple[str, str, str], tuple[BuildError, float, tuple]] = {}  # (error, monotonic time, _retry_knobs())
TRANSIENT_RETRY_S = 60.0
# Variants this machine can neither build nor load from an installed or cached binary, by (op, variant, system,
# the compatibility check's reasons).
_incompatible: dict[tuple, IncompatibleError] = {}


def _retry_knobs() -> tuple:
    """The knobs whose change builds a transient failure again at once (a longer limit, fewer jobs)."""
    return knobs.get("DSINF_BUILD_TIME_LIMIT"), knobs.get("MAX_JOBS")
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _variant_lock(key: tuple[str, str]) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def loaded_variants() -> dict[tuple[str, str], LoadedVariant]:
    return dict(_loaded)


class OpBuilder:
    """Base class. Subclasses set NAME, BUILD_VAR, VARIANTS and implement `compatible` / `spec`."""

    NAME: str = ""
    BUILD_VAR: str = ""
    VARIANTS: tuple[str, ...] = ()

    def __init__(self, system: System | None = None):
        self._system = system

    @property
    def system(self) -> System:
        return self._system or current_system()

    # ---- to implement -------------------------------------------------------------------------
    def compatible(self, variant: str) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self, variant: str, *, portable: bool = False) -> BuildSpec:  # pragma: no cover - abstract
        """The build of `variant`. `portable`: for a binary shipped to other machines (no -march=native,
        default arch list instead of the visible GPUs)."""
        raise NotImplementedError

    def key_fields(self, variant: str, spec: BuildSpec) -> dict[str, Any]:
        """Toolchain/runtime identity of a build, beyond the spec itself."""
        s = self.system
        return {"torch": s.torch_version, "cxx11_abi": s.torch_cxx11_abi, "python": s.python_tag,
                "platform": s.platform, "cxx": s.cxx.identity if s.cxx else None}

    def runtime_problems(self, variant: str, manifest: dict[str, Any]) -> list[str]:
        """Why a binary built elsewhere (with this manifest) cannot run here."""
        s = self.system
        fields = manifest.get("key_fields", {})
        problems = []
        for name, have in (("torch", s.torch_version), ("cxx11_abi", s.torch_cxx11_abi),
                           ("python", s.python_tag), ("platform", s.platform)):
            if fields.get(name) != have:
                problems.append(f"built for {name} {fields.get(name)}, running {have}")
        return problems

    def prebuilt_note(self, variant: str, manifest: dict[str, Any]) -> str | None:
        """What a user should know about the usable installed binary with this manifest (the report shows it):
        e.g. that it was built for less than this machine runs. None here."""
        return None

    def pre_load(self) -> None:
        """Runs before the library is loaded (e.g. define the op schemas)."""

    def post_load(self, variant: str) -> None:
        """Runs once per process after `variant` loaded (e.g. push persisted tuning data into it).
        `load_variant(variant)` already returns the loaded variant here."""

    def measured(self) -> list[dict[str, Any]]:
        """The persisted measurements this op's kernels are chosen by (route tables, autotune results), for
        the report: one dict each with "what", "path", "tables" ({table name: entries}) and "list" (the
        command that shows them). Read only, never raises. None here."""
        return []

    # ---- shared machinery ---------------------------------------------------------------------
    def key(self, variant: str, spec: BuildSpec) -> cache.BuildKey:
        root = csrc_root()
        files = cache.source_closure([Path(p) for p in spec.sources], [Path(p) for p in spec.include_dirs])
        # The kernels it must register are what a loader accepts the entry by: two versions of the package over
        # the same sources but different lists would otherwise reject and rebuild each other's entry in turn.
        return cache.BuildKey.of(
            op=self.NAME, variant=variant, builder=cache.BUILDER_VERSION,
            sources=cache.hash_files(files, root), cflags=list(spec.cflags), cuda_cflags=list(spec.cuda_cflags),
            ldflags=list(spec.ldflags), kernels=list(spec.kernels), **self.key_fields(variant, spec))

    def variant_dir(self, variant: str) -> Path:
        return cache.cache_root() / f"{self.NAME}-{variant}"

    def prebuilt_dir(self, variant: str) -> Path:
        return PREBUILT_DIR / f"{self.NAME}-{variant}"

    def prebuilt_problem(self, variant: str) -> str | None:
        """None if the installed binary of `variant` is usable here, else why not."""
        directory = self.prebuilt_dir(variant)
        if not directory.is_dir():
            return "not installed"
        problem = cache.entry_problem(directory, None, owners=trust.package_owners(PACKAGE_DIR))
        if problem:
            return problem
        problems = self.runtime_problems(variant, cache.read_manifest(directory) or {})
        return "; ".join(problems) or None

    def failed_build_log(self, variant: str) -> Path | None:
        """The log of the last failed build of the key this machine would build now, if the cache holds one
        (a later successful build publishes an entry, which the report shows instead)."""
        if not self.compatible(variant).ok:
            return None
        log_path = failed_dir(self.variant_dir(variant), self.key(variant, self.spec(variant)).digest) / "build.log"
        return log_path if log_path.is_file() else None

    def cached_entry(self, variant: str) -> tuple[Path | None, str | None]:
        """(entry dir, None) when the JIT cache holds a usable build for this machine, else (None, why)."""
        decision = self.compatible(variant)
        if not decision.ok:
            entry = self._published_without_tools(variant)  # loadable without the tools a build needs
            return (entry, None) if entry is not None else (None, "; ".join(decision.reasons))
        spec = self.spec(variant)
        return self._published(variant, spec, self.key(variant, spec).digest)

    def _published_without_tools(self, variant: str) -> Path | None:
        """The published entry of this machine's key when `compatible` refused a build (ninja missing, say):
        loading an intact entry needs no build tools. None when the key itself cannot be computed here."""
        try:
            spec = self.spec(variant)
            return self._published(variant, spec, self.key(variant, spec).digest)[0]
        except Exception:  # noqa: BLE001 - whatever the refusal's reasons made unknowable: they are raised
            return None

    def _cached_or_built(self, variant: str, reject: str | None, jobs: int | None, nice: int) -> tuple[Path, str]:
        """The published entry of this machine's key, else a build of it. A build whose sources changed while
        it ran is discarded (build.SourcesChanged) and the sources as they are now are built, a few times at
        most."""
        for _ in range(SOURCE_CHANGE_RETRIES + 1):
            spec = self.spec(variant)
            key = self.key(variant, spec)
            entry = None if reject else self._published(variant, spec, key.digest)[0]
            if entry is not None:  # published entries are immutable: a found one needs no lock, and no write
                return entry, "cached"
            memo = (self.NAME, variant, key.digest)
            if memo in _failed:
                failed, at, limit = _failed[memo]
                ago = time.monotonic() - at
                if not failed.transient:
                    raise BuildError(failed.op, failed.errors, failed.cause, failed.log_path,
                                     "(this build already failed in this process: not retried until its sources "
                                     "or flags change)", transient=False)
                if ago < TRANSIENT_RETRY_S and limit == _retry_knobs():
                    raise BuildError(failed.op, failed.errors, failed.cause, failed.log_path,
                                     f"(this build failed in this process {ago:.0f} s ago: built again "
                                     f"{TRANSIENT_RETRY_S:.0f} s after it, or at once when DSINF_BUILD_TIME_LIMIT "
                                     f"or MAX_JOBS changes)", transient=True)
            try:
                return build_or_wait(spec, key, self.variant_dir(variant), system_cpu_count=self.system.cpu_count,
                                     memory_available=self.system.memory_available, reject=reject, jobs=jobs,
                                     nice=nice, current_digest=lambda: self.key(variant, self.spec(variant)).digest)
            except BuildError as exc:
                _failed[memo] = (exc, time.monotonic(), _retry_knobs())
                raise
            except SourcesChanged as exc:
                log.warning("op_builder: %s: the build was discarded; building the sources as they are now", exc)
                changed = exc
        raise OpBuilderError(f"{changed}, {SOURCE_CHANGE_RETRIES + 1} times in a row: nothing was published. "
                             f"Load again once they stop changing")

    def _published(self, variant: str, spec: BuildSpec, digest: str) -> tuple[Path | None, str | None]:
        """The first trusted root's intact entry for `digest` (read only: a read-only cache serves as
        is), else (None, why the configured root's entry is unusable)."""
        why = "not built"
        for i, root in enumerate(cache.lookup_roots()):
            entry = root / f"{self.NAME}-{variant}" / digest
            problem = cache.entry_problem(entry, digest, kernels=spec.kernels)
            if problem is None:
                return entry, None
            if i == 0:
                why = problem
        return None, why

    def load_variants(self, variants: list[str]) -> list[LoadedVariant]:
        """Load `variants`, building the missing ones concurrently (DSINF_CONCURRENT_BUILDS), each with its
        compile jobs (`job_shares`). A failed build raises its own BuildError, as when built alone (the first
        failing variant's, in `variants` order; any other failure is logged), once every build has ended."""
        pending = [v for v in variants if (self.NAME, v) not in _loaded]
        if len(pending) > 1 and knobs.get("DSINF_CONCURRENT_BUILDS"):
            pending = [v for v in pending if self._needs_build(v)]
        located: dict[str, tuple[Path, str, dict[str, Any]]] = {}
        if len(pending) > 1 and knobs.get("DSINF_CONCURRENT_BUILDS"):
            specs = [self.spec(v) for v in pending]
            shares = job_shares(specs, self.system.cpu_count, self.system.memory_available)
            nices = niceness_increments(specs)
            log.info("building %s concurrently (%s compile jobs)", " and ".join(f"{self.NAME}[{v}]" for v in pending),
                     " + ".join(map(str, shares)))
            errors: dict[str, BaseException] = {}

            def build(variant: str, jobs: int, nice: int) -> None:
                try:
                    located[variant] = self._locate_or_build(variant, jobs=jobs, nice=nice)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                    errors[variant] = exc

            # Daemon threads: an interrupted caller exits at once; each worker then gets SIGTERM
            # (PR_SET_PDEATHSIG) and stops its compilers.
            threads = [threading.Thread(target=build, args=(v, n, nice), name=f"build {self.NAME}[{v}]", daemon=True)
                       for v, n, nice in zip(pending, shares, nices)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            failed = [v for v in pending if v in errors]
            for variant in failed[1:]:
                log.error("op_builder: %s", errors[variant])
            if failed:
                raise errors[failed[0]]
        return [self.load_variant(v, located=located.get(v)) for v in variants]

    def _needs_build(self, variant: str) -> bool:
        """Whether loading `variant` would compile: no usable installed binary and no published entry."""
        if not knobs.get("DSINF_NO_PREBUILT") and self.prebuilt_problem(variant) is None:
            return False
        if not self.compatible(variant).ok:
            return False  # load_variant raises the reasons
        return self.cached_entry(variant)[0] is None

    def load_variant(self, variant: str, *,
                     located: tuple[Path, str, dict[str, Any]] | None = None) -> LoadedVariant:
        """Load one variant (memoised). `located`: what `_locate_or_build` already returned for it."""
        memo_key = (self.NAME, variant)
        if memo_key in _loaded:
            return _loaded[memo_key]
        with _variant_lock(memo_key):
            if memo_key in _loaded:
                return _loaded[memo_key]
            start = time.monotonic()
            path, how, manifest = located or self._locate_or_build(variant)
            missing = self._load(path, variant, manifest)
            if missing:  # not the binary its manifest describes: reject it, build, load the build
                why = f"it loaded but registers no {dispatch_key(variant)} kernel for {', '.join(missing)}"
                if how == "built":
                    raise OpBuilderError(f"{self.NAME}[{variant}]: the library just built at {path}: {why}")
                log.warning("op_builder: %s[%s] from %s (%s) is rejected: %s; rebuilding", self.NAME, variant,
                            path, how, why)
                path, how, manifest = self._locate_or_build(variant, reject=why if how == "cached" else None,
                                                            prebuilt=False)
                missing = self._load(path, variant, manifest, again=True)
                if missing:
                    raise OpBuilderError(f"{self.NAME}[{variant}]: {path} registers no {dispatch_key(variant)} "
                                         f"kernel for {', '.join(missing)}")
            loaded = LoadedVariant(self.NAME, variant, path, how, manifest, time.monotonic() - start)
            _loaded[memo_key] = loaded  # before post_load, which may ask for the loaded variant
            log.debug("loaded %s[%s] (%s) from %s in %.3f s", self.NAME, variant, how, path, loaded.seconds)
            try:
                self.post_load(variant)
            except BaseException:  # e.g. a bad knob it reads: raised again on the next load, not only this one
                del _loaded[memo_key]
                raise
            return loaded

    def _load(self, path: Path, variant: str, manifest: dict[str, Any], *, again: bool = False) -> list[str]:
        """Load the library; return the kernels its manifest lists that it failed to register.

        `again`: a rejected library was loaded from this same path. dlopen matches by name first and
        would return that library's handle (it stays mapped), and torch.ops.load_library normalises
        the path: so open the new file under another spelling of its path (same RTLD_GLOBAL mode)."""
        self.pre_load()
        import torch

        if again:
            import ctypes

            ctypes.CDLL(f"{path.parent}/./{path.name}", mode=ctypes.RTLD_GLOBAL)
            torch.ops.loaded_libraries.add(str(path.resolve()))
        else:
            torch.ops.load_library(str(path))
        kernels = manifest.get("kernels") or []
        return missing_kernels(tuple(kernels), dispatch_key(variant))

    def _locate_or_build(self, variant: str, *, reject: str | None = None, prebuilt: bool = True,
                         jobs: int | None = None, nice: int = 0) -> tuple[Path, str, dict[str, Any]]:
        decision = self.compatible(variant)  # cheap: the system is probed once per process
        # Every op instance that resolves its backend asks: an answer of "nothing to load, nothing can be built"
        # is not worked out (installed binary checksummed, sources hashed, a warning) again for the same reasons.
        refused = (self.NAME, variant, self.system, tuple(decision.reasons))
        if not reject and refused in _incompatible:
            raise _incompatible[refused]
        prebuilt_why = None
        if prebuilt and not knobs.get("DSINF_NO_PREBUILT"):
            prebuilt_why = self.prebuilt_problem(variant)
            if prebuilt_why is None:
                directory = self.prebuilt_dir(variant)
                manifest = cache.read_manifest(directory)
                return directory / manifest["library"], "prebuilt", manifest
        if prebuilt_why not in (None, "not installed"):
            log.warning("op_builder: the installed %s[%s] binary cannot be used here (%s)%s", self.NAME, variant,
                        prebuilt_why, "; falling back to a JIT build" if decision.ok else "")
        if not decision.ok:
            entry = None if reject else self._published_without_tools(variant)
            if entry is None:
                reasons = list(decision.reasons)
                if prebuilt_why and prebuilt_why != "not installed":
                    reasons.append(f"installed binary unusable: {prebuilt_why}")
                _incompatible[refused] = IncompatibleError(f"{self.NAME}[{variant}]", reasons)
                raise _incompatible[refused]
            how = "cached"
        else:
            entry, how = self._cached_or_built(variant, reject, jobs, nice)
        manifest = cache.read_manifest(entry)
        if manifest is None:
            raise OpBuilderError(f"{self.NAME}[{variant}]: the manifest of {entry} vanished while loading")
        return entry / manifest["library"], how, manifest
