"""The goals, as data, and their evaluation into PASS / MISS / noisy / not measured.

A goal is judged "noisy" instead of PASS or MISS when
- it is timed on the host (CPU ops, host cost, builds) and the machine was loaded (load average above
  half the cores before the run: other processes compete for the cores), or
- the spread of its samples is wider than the margin between the measured value and the goal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .results import Report, Row

#: Peers on torch's side; "never slower than torch" compares with the fastest of those measured.
TORCH_PEERS = ("torch", "torch_kn", "torch_2gemm", "dense", "aten_int8", "onednn")
LARGE = 4096 * 12288  # "shapes >= 4096x12288" (K*N)


@dataclass(frozen=True)
class Goal:
    key: str
    text: str
    cmp: str  # ">=" | "<="
    target: float
    unit: str  # "x" | "%" | "s" | "ms" | "us"
    metric: str  # name in METRICS
    device: str = "any"  # where it can be measured: "cpu", "cuda", "any"
    host: bool = False  # timed on the host: a loaded machine makes it noisy


GOALS: tuple[Goal, ...] = (
    Goal("build.import", "import dsinf beyond import torch", "<=", 50.0, "ms", "import_ms", host=True),
    Goal("build.cpu.cold", "CPU module cold build (beyond import torch)", "<=", 20.0, "s", "cold_cpu", host=True),
    Goal("build.cpu.warm", "CPU module warm load (beyond import torch)", "<=", 0.3, "s", "warm_cpu", host=True),
    Goal("build.cuda.cold", "CUDA module cold build (beyond import torch)", "<=", 10.0, "s", "cold_cuda", "cuda",
         host=True),
    Goal("build.cuda.warm", "CUDA module warm load (beyond import torch)", "<=", 0.3, "s", "warm_cuda", "cuda",
         host=True),
    Goal("build.all", "load() of all variants / slower single variant", "<=", 1.10, "x", "load_all", "cuda",
         host=True),
    # timed on the calling thread's CPU time, paired with F.linear (bench/host_cost.py): a loaded machine does
    # not stretch it, and the paired spread still marks it noisy when it is wide
    Goal("host.cpu", "CPU per-call host cost minus F.linear's (worst op)", "<=", 2.0, "us", "host_cpu", "cpu"),
    Goal("host.cuda", "CUDA per-call host cost minus F.linear's (worst op)", "<=", 2.0, "us", "host_cuda", "cuda",
         host=True),
    Goal("never_slower", "never slower than torch: min ratio over all rows", ">=", 0.98, "x", "never_slower"),
    Goal("cpu.int8_vs_aten", "CPU int8 M=1 bf16 vs aten _weight_int8pack_mm bf16", ">=", 1.2, "x", "cpu_int8",
         "cpu", host=True),
    Goal("cpu.qkv", "CPU fused QKV+RoPE M=128 vs torch's chain (MKL or oneDNN, faster)", ">=", 1.2, "x", "cpu_qkv",
         "cpu", host=True),
    Goal("cpu.prefill", "CPU prefill linear+bias M=512 vs torch (addmm or oneDNN, faster; worst)", ">=", 0.95, "x",
         "cpu_prefill", "cpu", host=True),
    Goal("cuda.int8.bw_large", "CUDA int8 M<=8, >=4096x12288: % of copy bandwidth", ">=", 85.0, "%", "int8_bw",
         "cuda"),
    Goal("cuda.int8.vs_fp16_large", "CUDA int8 M<=8, >=4096x12288 vs torch fp16", ">=", 1.8, "x", "int8_large",
         "cuda"),
    Goal("cuda.int8.vs_fp16_4096", "CUDA int8 M<=8, 4096x4096 vs torch fp16", ">=", 1.6, "x", "int8_4096", "cuda"),
    Goal("cuda.decode.bw_large", "CUDA fp16/bf16 decode M<=8, >=4096x12288: % copy bw", ">=", 90.0, "%",
         "decode_bw", "cuda"),
    Goal("cuda.decode.vs_torch_4096", "CUDA fp16/bf16 decode M<=8 4096x4096 vs torch", ">=", 1.25, "x",
         "decode_4096", "cuda"),
    Goal("cuda.decode.vs_torch_all", "CUDA fp16/bf16 decode vs torch, every shape and M", ">=", 1.0, "x",
         "decode_all", "cuda"),
    Goal("cuda.prefill", "CUDA M=2048 linear+bias vs torch.addmm", ">=", 0.97, "x", "cuda_prefill", "cuda"),
    Goal("cuda.qkv", "CUDA fused QKV+RoPE vs eager torch chain (worst M)", ">=", 1.3, "x", "cuda_qkv", "cuda"),
    Goal("triton.decode", "Triton decode time / routed CUDA op time (worst)", "<=", 1.10, "x", "triton_decode",
         "cuda"),
    Goal("triton.prefill", "Triton M=2048 [N,K] vs cuBLAS addmm", ">=", 0.9, "x", "triton_prefill", "cuda"),
    Goal("mlp.vs_eager", "fused gated MLP M in {1,8} 4096->14336 vs eager chain", ">=", 1.3, "x", "mlp_eager",
         "cuda"),
    Goal("mlp.vs_2gemm", "fused gated MLP vs two cuBLAS GEMMs + torch ops", ">=", 0.98, "x", "mlp_2gemm", "cuda"),
    Goal("rmsnorm.bw", "PreRMSNorm hidden 4096/8192 M>=256: % of copy bw", ">=", 80.0, "%", "rmsnorm_bw", "cuda"),
)


@dataclass
class Measured:
    value: float | None
    lo: float | None = None  # spread of the value (None: no spread known)
    hi: float | None = None
    detail: str = ""
    why: str = ""  # why there is no value
    failed: bool = False  # no value because our implementation failed its reference check: a MISS


# --- verdict ------------------------------------------------------------------------------------------

def margin(goal: Goal, value: float) -> float | None:
    """Signed distance from the goal relative to it (> 0: met)."""
    if goal.target == 0:
        return None
    return value / goal.target - 1 if goal.cmp == ">=" else 1 - value / goal.target


def judge(goal: Goal, m: Measured, loaded: bool = False) -> dict[str, Any]:
    """`loaded`: the machine was loaded while this goal was timed on the host."""
    g = {"key": goal.key, "goal": goal.text, "target": f"{goal.cmp} {goal.target:g}{goal.unit}",
         "value": m.value, "unit": goal.unit, "lo": m.lo, "hi": m.hi, "detail": m.detail}
    if m.value is None:
        g.update(status="MISS" if m.failed else "not measured", margin=None, why=m.why or "not measured")
        return g
    ok = m.value >= goal.target if goal.cmp == ">=" else m.value <= goal.target
    mg = margin(goal, m.value)
    # an absolute goal on a difference (host cost) reads better as a difference than as a percentage
    text = (f"{goal.target - m.value:+.1f}{goal.unit}" if goal.unit == "us"
            else f"{mg * 100:+.0f}%" if mg is not None else "")
    g.update(margin=mg, margin_text=text, leans="PASS" if ok else "MISS")
    if loaded:
        g.update(status="noisy", why="machine loaded (load average above half the cores)")
    elif m.lo is not None and m.hi is not None and m.hi - m.lo > abs(m.value - goal.target):
        g.update(status="noisy", why=f"spread {m.lo:.3g}..{m.hi:.3g} wider than the margin to {goal.target:g}")
    else:
        g["status"] = "PASS" if ok else "MISS"
    return g


# --- metrics: Report -> Measured ---------------------------------------------------------------------

def _rows(report: Report, section: str, part: str, keep: Callable[[Row], bool] = lambda r: True) -> list[Row]:
    return [r for r in report.rows if r.case.section == section and r.case.part == part and keep(r)]


def _why(rows: list[Row], names: tuple[str, ...]) -> str:
    """Why none of `rows` gave a value: the first missing implementation's reason."""
    for row in rows:
        if row.note:
            return row.note[:90]
        for n in names:
            r = row.impls.get(n)
            if r is not None and r.status != "ok":
                return f"{n}: {r.reason}"[:90] if r.status == "n/a" else f"{n} FAIL: {r.reason}"[:90]
    return "no rows: its section or part did not run" if not rows else "not measured"


def fastest(row: Row, names: tuple[str, ...]) -> str | None:
    """The name among `names` with the shortest time on `row` (None: none measured)."""
    have = [n for n in names if row.us(n)]
    return min(have, key=row.us) if have else None


def _ratio(row: Row, peers: tuple[str, ...] = ("torch",), ours: str = "ours") -> Measured:
    """peer time / ours for the fastest of `peers`, with its spread."""
    p = fastest(row, peers)
    v = row.ratio(p, ours) if p else None
    sp = row.ratio_spread(p, ours) if v else None
    return Measured(v, *(sp or (None, None)), detail=f"vs {p}" if p and p != "torch" else "")


def _pct_bw(row: Row, copy_gbs: float | None) -> Measured:
    r = row.impls.get("ours")
    if not (copy_gbs and r and r.us):
        return Measured(None)
    pct = lambda us: row.case.bytes / us / 1e3 / copy_gbs * 100  # noqa: E731
    return Measured(pct(r.us), pct(r.timing.hi), pct(r.timing.lo))


def worst(rows: list[Row], metric: Callable[[Row], Measured], lower_is_better: bool = False,
          names: tuple[str, ...] = ("ours", "torch")) -> Measured:
    """The goal on the worst row (min for higher-is-better), named in the detail. A row where the measured
    implementation (`names[0]`) failed its reference check makes it a MISS, and a row skipped (--budget) makes
    it not measured: judged on the rest, a goal could PASS on the rows that happened to run."""
    for row in rows:
        r = row.impls.get(names[0])
        if r is not None and r.status == "FAIL":
            return Measured(None, why=f"{row.case.label}: {names[0]} FAIL: {r.reason}"[:90], failed=True)
    skipped = [row for row in rows if row.note]
    if skipped:
        return Measured(None, why=f"{len(skipped)} of {len(rows)} rows not measured ({skipped[0].note})"[:90])
    have = [(m, r) for r in rows for m in [metric(r)] if m.value is not None]
    if not have:
        return Measured(None, why=_why(rows, names))
    m, r = (max if lower_is_better else min)(have, key=lambda t: t[0].value)
    m.detail = f"worst {r.case.label}" + (f" {m.detail}" if m.detail else "") + \
        (f" ({len(rows) - len(have)} rows n/a)" if len(have) < len(rows) else "")
    return m


def _build(report: Report, variant: str, kind: str) -> Measured:
    e = report.build.get(variant, {}).get(kind, {})
    if kind == "cold":
        if "beyond_torch" in e:
            return Measured(e["beyond_torch"], detail=f"child {e['wall']:.1f}s")
        return Measured(None, why=(e.get("error") or "cold build not run").splitlines()[-1][:80])
    if "value" in e:
        return Measured(e["value"], e.get("lo"), e.get("hi"), detail=e.get("detail", ""))
    return Measured(None, why=(e.get("error") or e.get("skipped") or "not run")[:80])


def _load_all(report: Report) -> Measured:
    a = report.build.get("all", {})
    if "ratio" in a:
        return Measured(a["ratio"], a.get("lo"), a.get("hi"), detail=a.get("detail", ""))
    return Measured(None, why=a.get("why", "not run (needs the cold builds of two variants)"))


def _host(report: Report, device: str) -> Measured:
    h = report.host_cost.get(device)
    if not h:
        return Measured(None, why="host cost section not run")
    failed = [name for name, d in h.items() if d.get("why", "").startswith("FAIL")]
    if failed:  # a call that computes the wrong thing is not judged on the calls that do not
        return Measured(None, why=f"{failed[0]}: {h[failed[0]]['why']}"[:90], failed=True)
    rows = [(name, d) for name, d in h.items() if d.get("diff_us") is not None]
    if not rows:
        return Measured(None, why=next(iter(h.values())).get("why", "no op measured"))
    name, d = max(rows, key=lambda t: t[1]["diff_us"])
    return Measured(d["diff_us"], d.get("diff_lo"), d.get("diff_hi"), detail=f"worst {name}")


def _never_slower(report: Report) -> Measured:
    """Every row ours ran (or failed) on; a row ours does not serve (n/a) is not ours to be slower on."""
    rows = [r for r in report.rows if r.note or (r.impls.get("ours") and r.impls["ours"].status != "n/a")]
    return worst(rows, lambda r: _ratio(r, TORCH_PEERS))


def _copy(report: Report, section: str) -> float | None:
    return report.ceilings.get(f"{section}_copy_GBs")


def _ratio_at_bw(row: Row, copy_gbs: float | None) -> Measured:
    """`_ratio`, with each side's achieved GB/s beside the copy ceiling in the detail: a memory-bound
    goal can only be judged against what the memory delivers."""
    m = _ratio(row)
    gbs = {n: row.case.bytes / row.us(n) / 1e3 for n in ("ours", "torch") if row.us(n)}
    if gbs and copy_gbs:
        m.detail = (m.detail + " " if m.detail else "") + ", ".join(f"{n} {v:.1f}" for n, v in gbs.items()) + \
            f" GB/s of {copy_gbs:.1f} copy"
    return m


M8 = lambda r: r.case.M <= 8  # noqa: E731
F16 = lambda r: r.case.dtype == "fp16"  # noqa: E731 - the int8 goals' rows: fp16 activations, as their peer
BIG = lambda r: r.case.K * r.case.N >= LARGE  # noqa: E731
SQ = lambda r: (r.case.K, r.case.N) == (4096, 4096)  # noqa: E731
FP16_PEERS = ("torch", "torch_kn")
# torch's fp32 CPU GEMMs: MKL (F.linear, addmm) and oneDNN (what torch's frozen CPU linears run), whichever is
# faster on the host: MKL takes a generic path on AMD CPUs, where oneDNN is torch's fast one.
CPU_PEERS = ("torch", "onednn")

METRICS: dict[str, Callable[[Report], Measured]] = {
    "import_ms": lambda rep: Measured(*(lambda d: (d.get("median"), d.get("lo"), d.get("hi")))(
        rep.build.get("import_dsinf_ms", {})), why="import child not run"),
    "cold_cpu": lambda rep: _build(rep, "cpu", "cold"),
    "warm_cpu": lambda rep: _build(rep, "cpu", "warm"),
    "cold_cuda": lambda rep: _build(rep, "cuda", "cold"),
    "warm_cuda": lambda rep: _build(rep, "cuda", "warm"),
    "load_all": _load_all,
    "host_cpu": lambda rep: _host(rep, "cpu"),
    "host_cuda": lambda rep: _host(rep, "cuda"),
    "never_slower": _never_slower,
    "cpu_int8": lambda rep: worst(_rows(rep, "cpu", "int8", lambda r: r.case.dtype == "bf16" and r.case.M == 1),
                                  lambda r: _ratio_at_bw(r, _copy(rep, "cpu"))),
    "cpu_qkv": lambda rep: worst(_rows(rep, "cpu", "qkv", lambda r: r.case.M == 128), lambda r: _ratio(r, CPU_PEERS)),
    "cpu_prefill": lambda rep: worst(_rows(rep, "cpu", "prefill"), lambda r: _ratio(r, CPU_PEERS)),
    "int8_bw": lambda rep: worst(_rows(rep, "cuda", "int8", lambda r: F16(r) and M8(r) and BIG(r)),
                                 lambda r: _pct_bw(r, _copy(rep, "cuda"))),
    "int8_large": lambda rep: worst(_rows(rep, "cuda", "int8", lambda r: F16(r) and M8(r) and BIG(r)),
                                    lambda r: _ratio(r, FP16_PEERS)),
    "int8_4096": lambda rep: worst(_rows(rep, "cuda", "int8", lambda r: F16(r) and M8(r) and SQ(r)),
                                   lambda r: _ratio(r, FP16_PEERS)),
    "decode_bw": lambda rep: worst(_rows(rep, "cuda", "decode", lambda r: M8(r) and BIG(r)),
                                   lambda r: _pct_bw(r, _copy(rep, "cuda"))),
    "decode_4096": lambda rep: worst(_rows(rep, "cuda", "decode", lambda r: M8(r) and SQ(r)), _ratio),
    "decode_all": lambda rep: worst(_rows(rep, "cuda", "decode"), _ratio),
    "cuda_prefill": lambda rep: worst(_rows(rep, "cuda", "prefill"), _ratio),
    "cuda_qkv": lambda rep: worst(_rows(rep, "cuda", "qkv"), _ratio),
    "triton_decode": lambda rep: worst(
        [r for p in ("decode", "int8") for r in _rows(rep, "cuda", p, lambda r: r.case.M <= 16)],
        lambda r: _ratio(r, ("triton",)), lower_is_better=True, names=("ours", "triton")),
    "triton_prefill": lambda rep: worst(_rows(rep, "cuda", "prefill", lambda r: r.case.layout == "nk"),
                                        lambda r: _ratio(r, ("torch",), "triton"), names=("triton", "torch")),
    "mlp_eager": lambda rep: worst(_rows(rep, "cuda", "mlp"), _ratio),
    "mlp_2gemm": lambda rep: worst(_rows(rep, "cuda", "mlp"), lambda r: _ratio(r, ("torch_2gemm",)),
                                   names=("ours", "torch_2gemm")),
    "rmsnorm_bw": lambda rep: worst(_rows(rep, "cuda", "rmsnorm", lambda r: r.case.M >= 256),
                                    lambda r: _pct_bw(r, _copy(rep, "cuda"))),
}


def evaluate(report: Report, device: str, loaded: bool) -> list[dict[str, Any]]:
    """Every goal, judged. A goal of another device than this run's reads "not measured" with why; a
    goal of any device is host-timed in a CPU run."""
    out = []
    for goal in GOALS:
        m = METRICS[goal.metric](report)
        if m.value is None and goal.device not in ("any", device):
            m.why = f"{goal.device} goal; this run: --device {device}"
        host = goal.host or (goal.device == "any" and device == "cpu")
        out.append(judge(goal, m, loaded and host))
    return out
