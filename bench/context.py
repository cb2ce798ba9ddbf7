"""`Context`: the state of one run, passed to every section (no module-global state)."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from .results import Report
from .timing import is_loaded


def out(text: str = "") -> None:
    print(text, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass
class Context:
    args: argparse.Namespace
    device: str  # "cpu" | "cuda": whose ops section runs
    report: Report
    parts: set[str]  # the parts of the ops sections to run
    started: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter() after which remaining cases are skipped (--budget)
    load: float = 0.0  # 1-minute load average before the run, and the cores it is shared by
    cores: int = 1
    cold: bool = False  # does the build section measure cold builds
    #: variant -> error of its cold build in this run: the ops sections then do not build it again.
    cold_build_failed: dict[str, str] = field(default_factory=dict)
    scratch: list[str] = field(default_factory=list)  # temporary caches to delete when the run ends

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def loaded(self) -> bool:
        """Other processes competed for the cores: host-side (CPU) verdicts are noisy."""
        return is_loaded(self.load, self.cores)

    def budget_exhausted(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def note(self, text: str) -> None:
        self.report.notes.append(text)
        out(f"  ! {text}")
