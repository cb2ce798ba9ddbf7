"""What a run records: per case a `Row` of implementation results, and the `Report` of the whole run
(rows, build numbers, ceilings, host cost, notes, goals) that becomes the JSON file."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .cases import Case
from .timing import Timing


@dataclass
class ImplResult:
    name: str
    status: str  # "ok" | "FAIL" | "n/a"
    reason: str = ""
    err: float | None = None
    copies: int = 0
    timing: Timing | None = None

    @property
    def us(self) -> float | None:
        return self.timing.us if (self.status == "ok" and self.timing) else None


@dataclass
class Row:
    case: Case
    impls: dict[str, ImplResult] = field(default_factory=dict)
    note: str = ""

    def us(self, name: str) -> float | None:
        r = self.impls.get(name)
        return r.us if r else None

    def ratio(self, other: str = "torch", ours: str = "ours") -> float | None:
        """other's time / ours (> 1: ours is faster)."""
        a, b = self.us(other), self.us(ours)
        return a / b if (a and b) else None

    def ratio_spread(self, other: str = "torch", ours: str = "ours") -> tuple[float, float] | None:
        """(lo, hi) of the ratio from both timings' spreads."""
        a, b = self.impls.get(other), self.impls.get(ours)
        if not (a and b and a.us and b.us):
            return None
        return a.timing.lo / b.timing.hi, a.timing.hi / b.timing.lo

    def gbs(self, name: str = "ours") -> float | None:
        us = self.us(name)
        return self.case.bytes / us / 1e3 if us else None

    def tflops(self, name: str = "ours") -> float | None:
        us = self.us(name)
        return self.case.flops / us / 1e6 if (us and self.case.flops) else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self.case)
        d.update(label=self.case.label, M=self.case.M, bytes=self.case.bytes, flops=self.case.flops, note=self.note)
        d["impls"] = {}
        for name, r in self.impls.items():
            e = {"status": r.status, "reason": r.reason, "err": r.err, "copies": r.copies}
            if r.timing:
                e.update(asdict(r.timing))
            if r.us:
                e.update(GBs=self.gbs(name), TFLOPs=self.tflops(name))
            d["impls"][name] = e
        return d


@dataclass
class Report:
    args: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    ceilings: dict[str, Any] = field(default_factory=dict)
    host_cost: dict[str, Any] = field(default_factory=dict)  # device -> {impl: {...}}
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # sections that report their own data (e2e)
    notes: list[str] = field(default_factory=list)  # section skips / failures, with why
    goals: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "args": self.args, "build": self.build, "ceilings": self.ceilings,
                "host_cost": self.host_cost, "rows": [r.to_json() for r in self.rows], "extra": self.extra,
                "notes": self.notes, "goals": self.goals}
