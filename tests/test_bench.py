"""The benchmark's pure parts (cases, byte/FLOP counts, goal evaluation, section selection, tables)
and one end-to-end run of a cheap section in a child process."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import goals, sections
from bench.cases import CPU_INT8_SHAPES, Case, copies_for, cpu_cases, cuda_cases
from bench.env import Env, Unavailable
from bench.goals import GOALS, Goal, Measured, evaluate, judge
from bench.impls import build_impls, run_case
from bench.ops import PART_TABLES, part_table, row_cells
from bench.report import goals_table
from bench.results import ImplResult, Report, Row
from bench.tables import Column, Table
from bench.timing import Timing, spread, time_cpu

ROOT = Path(__file__).resolve().parent.parent


# --- cases: bytes and FLOPs ---------------------------------------------------------------------------

def test_bytes_and_flops_of_each_op():
    vm = Case("cuda", "decode", "vector_matmul", "fp16", "kn", 1, 1, 4096, 4096)
    assert vm.M == 1 and vm.weight_bytes == 4096 * 4096 * 2
    assert vm.bytes == 4096 * 4096 * 2 + 4096 * 2 + 4096 * 2  # weight, x, out
    assert vm.flops == 2 * 4096 * 4096
    i8 = Case("cuda", "int8", "vector_matmul", "fp16", "int8", 4, 1, 4096, 12288)
    assert i8.M == 4 and i8.weight_bytes == 4096 * 12288
    assert i8.bytes == 4096 * 12288 + 4 * 4096 * 2 + 4 * 12288 * 2 + 12288 * 4  # + fp32 scales
    lin = Case("cpu", "prefill", "linear", "fp32", "nk", 1, 512, 4096, 4096)
    assert lin.bytes == 4096 * 4096 * 4 + 512 * 4096 * 4 * 2 + 4096 * 4  # + bias
    mlp = Case("cuda", "mlp", "mlp", "fp16", "nk", 8, 1, 4096, 14336)
    assert mlp.weight_bytes == 3 * 4096 * 14336 * 2  # gate, up, down
    assert mlp.bytes == mlp.weight_bytes + 4 * 8 * 4096 * 2 + 4096 * 2
    assert mlp.flops == 3 * 2 * 8 * 4096 * 14336
    rms = Case("cuda", "rmsnorm", "pre_rms_norm", "fp16", "nk", 1, 256, 8192, 8192)
    assert rms.bytes == 4 * 256 * 8192 * 2 + 8192 * 2 and rms.flops == 0


def test_copies_cover_the_cache_within_bounds():
    assert copies_for(16 << 20, 50 << 20, 4.0, 2, 16) == 13  # ceil(200 / 16)
    assert copies_for(400 << 20, 50 << 20, 4.0, 2, 16) == 2  # lower bound
    assert copies_for(1, 50 << 20, 4.0, 2, 16) == 16  # upper bound


@pytest.mark.parametrize("quick", [True, False])
def test_plans_cover_the_goals(quick):
    cpu, cuda = cpu_cases(quick), cuda_cases(quick)
    for plan in (cpu, cuda):
        assert len({c.label for c in plan}) == len(plan), "every case has its own label"
    # CPU int8 goal: both shapes with bf16 activations; QKV goal at M=128
    assert {(c.K, c.N) for c in cpu if c.part == "int8" and c.dtype == "bf16"} == set(CPU_INT8_SHAPES)
    assert any(c.part == "qkv" and c.M == 128 for c in cpu)
    # CPU batch-8 decode (full plan): bf16 and fp32 in both layouts, int8 with bf16 activations
    assert {(c.part, c.dtype, c.layout) for c in cpu if c.M == 8} == (
        set() if quick
        else {("decode", d, layout) for d in ("bf16", "fp32") for layout in ("nk", "kn")} | {("int8", "bf16", "int8")})
    # CUDA goals: large int8/decode shapes at M<=8, 4096x4096, both layouts, [N,K] prefill, MLP M in {1,8}
    assert any(c.part == "int8" and c.M <= 8 and c.K * c.N >= goals.LARGE for c in cuda)
    assert {c.layout for c in cuda if c.part == "decode" and c.K * c.N >= goals.LARGE and c.M <= 8} == {"kn", "nk"}
    assert any(c.part == "decode" and (c.K, c.N) == (4096, 4096) for c in cuda)
    assert any(c.part == "prefill" and c.layout == "nk" for c in cuda)
    assert sorted(c.M for c in cuda if c.part == "mlp") == [1, 8]
    # int8 weights at prompt lengths: past the GEMV, both activation dtypes in the full plan
    prefill = [c for c in cuda if c.part == "int8prefill"]
    assert prefill and all(c.layout == "int8" and c.M >= 128 for c in prefill)
    assert {c.M for c in prefill} >= {128, 2048}
    assert {c.dtype for c in prefill} == ({"fp16"} if quick else {"fp16", "bf16"})
    assert {c.K for c in cuda if c.part == "rmsnorm" and c.M >= 256} == {4096, 8192}
    # int8 decode with bf16 activations too (full plan), on every decode shape
    i8 = [c for c in cuda if c.part == "int8"]
    assert {(c.K, c.N) for c in i8 if c.dtype == "bf16"} == (set() if quick else {(c.K, c.N) for c in i8})


# --- tables ---------------------------------------------------------------------------------------------

def test_table_names_every_column_and_prints_the_min_ratio():
    t = Table("t", [Column("case", 10, left=True), Column("ratio", 6)])
    header = t.header()[1]
    assert "case" in header and "ratio" in header
    t.row(["a", "1.50x"], [1.5], "row a")
    t.row(["b", "0.90x"], [0.9], "row b")
    t.row(["c", "n/a"], [None], "row c")
    assert t.footer().strip() == "min ratio (torch/ours): 0.90x at row b (over 2 ratios in 3 rows)"
    with pytest.raises(ValueError, match="name"):
        Table("bad", [Column("case", 10), Column(" ", 6)])
    with pytest.raises(ValueError, match="cells"):
        t.row(["only one"])
    assert "n/a" in Table("e", [Column("x", 3)]).footer()


@pytest.mark.parametrize("key", sorted(PART_TABLES))
def test_every_ops_table_names_each_cell(key):
    section, part = key
    table, extras = part_table(section, part)
    assert all(c.name.strip() for c in table.columns)
    case = Case(section, part, "vector_matmul", "fp16", "nk", 1, 1, 64, 64)
    t = Timing(10.0, 9.0, 11.0, 5, 1)
    row = Row(case, {n: ImplResult(n, "ok", timing=t) for n in ("ours", "torch", *extras)})
    line = table.row(row_cells(row, extras, 100.0), [row.ratio()])
    assert len(line.split()) >= len(table.columns)
    assert "1.00x" in table.footer()


def test_goals_table_lists_every_goal():
    lines = goals_table(evaluate(Report(args={}), "cpu", loaded=False))
    text = "\n".join(lines)
    for g in GOALS:
        assert g.text[:54] in text
    assert "min ratio" in lines[-1]


# --- goals --------------------------------------------------------------------------------------------

G = Goal("k", "a ratio goal", ">=", 1.2, "x", "never_slower")
HOST = Goal("h", "a host goal", "<=", 2.0, "us", "host_cpu", host=True)


def test_judge_pass_miss_noisy_not_measured():
    assert judge(G, Measured(1.5, 1.45, 1.55))["status"] == "PASS"
    assert judge(G, Measured(1.0, 0.98, 1.02))["status"] == "MISS"
    noisy = judge(G, Measured(1.25, 1.1, 1.4))  # spread 0.3 wider than margin 0.05
    assert noisy["status"] == "noisy" and noisy["leans"] == "PASS" and "spread" in noisy["why"]
    assert judge(G, Measured(1.5))["status"] == "PASS"  # no spread known: judged on the value
    assert judge(G, Measured(None, why="x"))["status"] == "not measured"
    assert judge(HOST, Measured(0.5, 0.4, 0.6), loaded=True)["status"] == "noisy"
    assert judge(HOST, Measured(3.0, 2.9, 3.1))["status"] == "MISS"
    assert judge(HOST, Measured(3.0))["margin_text"] == "-1.0us"


def test_issue_goals_are_listed_with_their_thresholds():
    want = {
        "cuda.int8.bw_large": (">=", 85.0), "cuda.int8.vs_fp16_large": (">=", 1.8),
        "cuda.int8.vs_fp16_4096": (">=", 1.6), "cuda.decode.bw_large": (">=", 90.0),
        "cuda.decode.vs_torch_4096": (">=", 1.25), "cuda.decode.vs_torch_all": (">=", 1.0),
        "never_slower": (">=", 0.98), "triton.decode": ("<=", 1.1), "triton.prefill": (">=", 0.9),
        "cpu.int8_vs_aten": (">=", 1.2), "cpu.qkv": (">=", 1.2), "build.all": ("<=", 1.1),
        "build.cuda.cold": ("<=", 10.0), "host.cpu": ("<=", 2.0), "host.cuda": ("<=", 2.0),
        "mlp.vs_eager": (">=", 1.3), "mlp.vs_2gemm": (">=", 0.98), "rmsnorm.bw": (">=", 80.0),
    }
    have = {g.key: (g.cmp, g.target) for g in GOALS}
    assert {k: have.get(k) for k in want} == want
    assert all(g.metric in goals.METRICS for g in GOALS)


def _row(section, part, K, N, M=1, layout="nk", **us):
    case = Case(section, part, "vector_matmul", "fp16", layout, M, 1, K, N)
    return Row(case, {n: ImplResult(n, "ok", timing=Timing(t, t * 0.99, t * 1.01, 15, 100)) for n, t in us.items()})


def test_evaluate_picks_the_worst_row_and_the_right_peer():
    rep = Report(args={})
    rep.ceilings["cuda_copy_GBs"] = 4000.0
    rep.rows = [
        # int8: torch fp16 is the faster of its two layouts (kn here): 20/10 = 2.0, not 30/10
        _row("cuda", "int8", 4096, 12288, layout="int8", ours=10.0, torch=30.0, torch_kn=20.0),
        _row("cuda", "int8", 4096, 14336, M=8, layout="int8", ours=10.0, torch=19.0, torch_kn=25.0),
        _row("cuda", "decode", 4096, 4096, ours=10.0, torch=13.0),
        _row("cuda", "decode", 4096, 4096, M=8, layout="kn", ours=10.0, torch=12.0),
    ]
    got = {g["key"]: g for g in evaluate(rep, "cuda", loaded=False)}
    assert got["cuda.int8.vs_fp16_large"]["value"] == pytest.approx(1.9)
    assert "4096x14336" in got["cuda.int8.vs_fp16_large"]["detail"]
    assert got["cuda.decode.vs_torch_4096"]["value"] == pytest.approx(1.2)
    assert got["cuda.decode.vs_torch_4096"]["status"] == "MISS"
    # never slower: min over rows of the fastest torch peer
    assert got["never_slower"]["value"] == pytest.approx(1.2)
    assert got["cuda.int8.bw_large"]["value"] == pytest.approx(
        rep.rows[0].case.bytes / 10.0 / 1e3 / 4000.0 * 100)
    assert got["cpu.qkv"]["status"] == "not measured"


def test_the_cuda_int8_goals_read_fp16_rows_and_triton_reads_both():
    """The int8 goals compare against torch fp16, so they read the fp16 rows; the bf16 rows count for
    "never slower" and for Triton against the CUDA module."""
    def row(dtype, ours, torch, triton):
        case = Case("cuda", "int8", "vector_matmul", dtype, "int8", 1, 1, 4096, 14336)
        return Row(case, {n: ImplResult(n, "ok", timing=Timing(t, t * 0.99, t * 1.01, 15, 100))
                          for n, t in (("ours", ours), ("torch", torch), ("triton", triton))})

    rep = Report(args={})
    rep.ceilings["cuda_copy_GBs"] = 4000.0
    rep.rows = [row("fp16", 10.0, 20.0, 10.5), row("bf16", 12.0, 13.2, 15.0)]
    got = {g["key"]: g for g in evaluate(rep, "cuda", loaded=False)}
    assert got["cuda.int8.vs_fp16_large"]["value"] == pytest.approx(2.0)
    assert got["cuda.int8.bw_large"]["value"] == pytest.approx(rep.rows[0].case.bytes / 10.0 / 1e3 / 4000.0 * 100)
    assert got["never_slower"]["value"] == pytest.approx(1.1)
    assert got["triton.decode"]["value"] == pytest.approx(1.25)


def test_the_cpu_int8_goal_reads_the_m1_rows_only():
    """The CPU int8 goal is M = 1 against aten's int8 kernel; the batch-8 row counts for "never slower" only."""
    def row(M, ours, torch):
        case = Case("cpu", "int8", "vector_matmul", "bf16", "int8", M, 1, 4096, 11008)
        return Row(case, {n: ImplResult(n, "ok", timing=Timing(t, t * 0.99, t * 1.01, 15, 100))
                          for n, t in (("ours", ours), ("torch", torch))})

    rep = Report(args={})
    rep.ceilings["cpu_copy_GBs"] = 40.0
    rep.rows = [row(1, 10.0, 15.0), row(8, 10.0, 11.0)]
    got = {g["key"]: g for g in evaluate(rep, "cpu", loaded=False)}
    assert got["cpu.int8_vs_aten"]["value"] == pytest.approx(1.5)
    assert got["never_slower"]["value"] == pytest.approx(1.1)


def test_a_goal_is_never_judged_on_part_of_its_rows():
    """A goal used to be judged on the rows left after dropping those where ours failed its reference check
    or a --budget skip: a decode goal read PASS on its M=1 row with ours wrong at M=8, and "never slower"
    did not even count the failed row."""
    rep = Report(args={})
    good = _row("cuda", "decode", 4096, 4096, ours=10.0, torch=14.0)
    wrong = _row("cuda", "decode", 4096, 4096, M=8, ours=10.0, torch=14.0)
    wrong.impls["ours"] = ImplResult("ours", "FAIL", reason="rel err 0.3 > 0.005")
    rep.rows = [good, wrong]
    got = {g["key"]: g for g in evaluate(rep, "cuda", loaded=False)}
    for key in ("cuda.decode.vs_torch_4096", "cuda.decode.vs_torch_all", "never_slower"):
        assert got[key]["status"] == "MISS" and "FAIL" in got[key]["why"], got[key]
    skipped = Row(Case("cuda", "decode", "vector_matmul", "fp16", "nk", 8, 1, 4096, 4096),
                  note="skipped: --budget exhausted")
    rep.rows = [good, skipped]
    got = {g["key"]: g for g in evaluate(rep, "cuda", loaded=False)}
    for key in ("cuda.decode.vs_torch_4096", "never_slower"):
        assert got[key]["status"] == "not measured" and "--budget" in got[key]["why"], got[key]
    # a row ours does not serve (n/a) is not ours to be slower on
    na = _row("cuda", "decode", 4096, 4096, M=8, ours=10.0, torch=14.0)
    na.impls["ours"] = ImplResult("ours", "n/a", reason="bf16 needs compute capability 8.0")
    rep.rows = [good, na]
    assert {g["key"]: g for g in evaluate(rep, "cuda", loaded=False)}["never_slower"]["status"] == "PASS"


def test_the_host_cost_goal_is_a_miss_when_a_call_computes_the_wrong_thing():
    rep = Report(args={})
    rep.host_cost["cpu"] = {"F.linear": {"us": 5.0}, "VectorMatMulOp [compiled]": {"why": "FAIL: rel err 1e-1 > 1e-4"},
                            "LinearOp + bias [compiled]": {"us": 5.4, "diff_us": 0.4, "diff_lo": 0.3, "diff_hi": 0.5}}
    got = {g["key"]: g for g in evaluate(rep, "cpu", loaded=False)}["host.cpu"]
    assert got["status"] == "MISS" and "VectorMatMulOp" in got["why"], got


def test_the_cpu_fp32_goals_compare_with_torchs_faster_gemm():
    """torch's fp32 CPU GEMM on MKL takes a generic path on AMD hosts, where oneDNN (what torch's frozen
    linears run) is its fast one: the QKV and prefill goals read the faster of the two (they read MKL's)."""
    def row(part, M, ours, torch, onednn):
        case = Case("cpu", part, "linear", "fp32", "nk", M, 1, 4096, 12288)
        return Row(case, {n: ImplResult(n, "ok", timing=Timing(t, t * 0.99, t * 1.01, 15, 100))
                          for n, t in (("ours", ours), ("torch", torch), ("onednn", onednn))})

    rep = Report(args={})
    rep.rows = [row("qkv", 128, 10.0, 21.0, 10.3), row("prefill", 512, 10.0, 22.0, 10.0)]
    got = {g["key"]: g for g in evaluate(rep, "cpu", loaded=False)}
    assert got["cpu.qkv"]["value"] == pytest.approx(1.03) and got["cpu.qkv"]["status"] == "MISS"
    assert "vs onednn" in got["cpu.qkv"]["detail"]
    assert got["cpu.prefill"]["value"] == pytest.approx(1.0)


def test_a_loaded_machine_makes_host_side_goals_noisy_only():
    rep = Report(args={})
    rep.rows = [_row("cuda", "decode", 4096, 4096, ours=10.0, torch=15.0)]
    rep.host_cost["cpu"] = {"op": {"us": 9.0, "diff_us": 5.0, "diff_lo": 4.9, "diff_hi": 5.1}}
    rep.host_cost["cuda"] = {"op": {"us": 9.0, "diff_us": 1.0, "diff_lo": 0.9, "diff_hi": 1.1}}
    on_gpu = {g["key"]: g["status"] for g in evaluate(rep, "cuda", loaded=True)}
    assert on_gpu["cuda.decode.vs_torch_4096"] == "PASS" and on_gpu["never_slower"] == "PASS"
    assert on_gpu["host.cuda"] == "noisy"  # wall time on a loaded host
    # the CPU host cost is timed on the thread's CPU time, paired with F.linear: load does not make it noisy
    assert on_gpu["host.cpu"] == "MISS"
    on_cpu = {g["key"]: g["status"] for g in evaluate(rep, "cpu", loaded=True)}
    assert on_cpu["never_slower"] == "noisy"  # a CPU run times its rows on the host
    assert {g["key"]: g["status"] for g in evaluate(rep, "cpu", loaded=False)}["host.cpu"] == "MISS"


def test_load_all_reads_the_median_round_and_its_spread():
    from bench.build_times import load_all_summary

    rounds = [{"all": 12.9, "cpu": 11.4, "cuda": 7.4}, {"all": 11.5, "cpu": 11.7, "cuda": 8.7},
              {"all": 11.0, "cpu": 10.0, "cuda": 10.5}]
    got = load_all_summary(rounds)
    # each round against its own slower single variant: 12.9 / 11.4, 11.5 / 11.7, 11.0 / 10.5
    assert got["ratios"] == pytest.approx([12.9 / 11.4, 11.5 / 11.7, 11.0 / 10.5])
    assert got["ratio"] == pytest.approx(11.0 / 10.5) and got["lo"] == pytest.approx(11.5 / 11.7)
    assert got["hi"] == pytest.approx(12.9 / 11.4)
    rep = Report(args={})
    rep.build["all"] = got
    status = {g["key"]: g for g in evaluate(rep, "cuda", loaded=False)}["build.all"]
    assert status["status"] == "noisy" and status["leans"] == "PASS"  # 1.05 median, one round at 1.13
    rep.build["all"] = load_all_summary([{"all": 10.2, "cpu": 10.0, "cuda": 8.0}] * 3)
    assert {g["key"]: g["status"] for g in evaluate(rep, "cuda", loaded=False)}["build.all"] == "PASS"


def test_load_all_builds_rounds_in_a_rotated_order(monkeypatch):
    """The rounds after the first build every variant again (all, cpu, cuda in a rotated order); a round
    with a failed build is dropped, and the budget stops the rounds."""
    from bench import build_times
    from bench.context import Context

    ctx = Context(args=argparse.Namespace(quick=False, json=None), device="cuda", report=Report(args={}),
                  parts=set())
    ctx.report.build.update(cpu={"cold": {"beyond_torch": 13.0, "in_process": 10.0}},
                            cuda={"cold": {"beyond_torch": 11.0, "in_process": 8.0}})
    built = []

    def cold(ctx_, variant, base, timeout):
        ctx_.report.build.setdefault(variant, {})["cold"] = {"beyond_torch": 14.0, "in_process": 11.0}
        return None

    def again(variant, timeout):
        built.append(variant)
        return None if len(built) == 5 else {"all": 10.5, "cpu": 10.0, "cuda": 7.0}[variant]

    monkeypatch.setattr(build_times, "_cold", cold)
    monkeypatch.setattr(build_times, "_cold_seconds", again)
    monkeypatch.setattr(build_times, "LOAD_ALL_ROUNDS", 4)
    build_times._load_all(ctx, ["cpu", "cuda"], None, 60.0, [])
    assert built == ["cpu", "cuda", "all", "cuda", "all", "cpu", "all", "cpu", "cuda"]
    a = ctx.report.build["all"]
    assert len(a["rounds"]) == 3 and a["ratios"] == pytest.approx([1.1, 1.05, 1.05])  # the third dropped
    assert any("round 3 dropped" in n for n in ctx.report.notes)

    built.clear()
    ctx.report.notes.clear()
    ctx.deadline = build_times.time.perf_counter() + 30.0  # less than two rounds' builds (10 + 8 + 11 s)
    build_times._load_all(ctx, ["cpu", "cuda"], None, 60.0, [])
    assert built == [] and len(ctx.report.build["all"]["rounds"]) == 1
    assert any("the budget left no more" in n for n in ctx.report.notes)


def test_load_all_times_the_childrens_load_calls(monkeypatch, tmp_path):
    """A round's seconds are the child's own load() (its in_process timer), not its wall: the child's
    `import torch` varies by seconds from one child to the next and is not load()'s."""
    from bench import build_times

    def child(variant, timeout):
        return str(tmp_path / variant), {"ok": True, "wall": 14.0, "data": {"in_process": 8.25, "how": how}}

    monkeypatch.setattr(build_times, "_cold_child", child)
    how = "built"
    assert build_times._cold_seconds("cuda", 60.0) == 8.25
    how = "cached"  # a child that found a build did not time one
    assert build_times._cold_seconds("cuda", 60.0) is None


def test_the_real_load_child_times_load_not_import_torch(cpu_module):
    """The bench's load child itself (LOAD_CHILD, as the build section runs it), on the session's warm CPU
    build: its in_process seconds are load()'s alone. `import torch`, which a child spends a second or more
    on, must be outside them (a timer started before it would put every child's import into the load goal)."""
    from bench.adapter import LOAD_CHILD
    from bench.build_times import child_env, run_child

    r = run_child(LOAD_CHILD, ["cpu"], child_env(DSINF_NO_PREBUILT="1"), 300.0)
    assert r["ok"] and r["data"]["how"] == "cached", r
    imports = []
    for _ in range(2):  # after the child, so the import is as warm as it was there
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=child_env(), check=True, timeout=300)
        imports.append(time.perf_counter() - t0)
    assert r["data"]["in_process"] < min(imports) / 2 < r["wall"], (r, imports)


def test_evaluate_without_measurements_says_why():
    got = evaluate(Report(args={}), "cpu", loaded=True)
    assert [g["key"] for g in got] == [g.key for g in GOALS]
    assert all(g["status"] == "not measured" and g["why"] for g in got)
    assert next(g for g in got if g["key"] == "mlp.vs_eager")["why"] == "cuda goal; this run: --device cpu"


def test_spread_uses_quartiles_from_four_samples():
    assert spread([1.0, 2.0, 3.0]) == (1.0, 3.0)
    lo, hi = spread([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 100.0])
    assert hi < 100.0 and lo > 1.0


# --- section selection ----------------------------------------------------------------------------------

def test_select_sections():
    parts = set(sections.OPS_PARTS)
    assert sections.select(set(), "cpu", None) == (["build", "cpu", "hostcost"], parts)
    assert sections.select(set(), "cuda", False) == (["cuda", "hostcost"], parts)
    assert sections.select({"int8"}, "cpu", None) == (["cpu"], {"int8"})
    assert sections.select({"cuda", "decode"}, "cpu", None) == (["cuda"], {"decode"})
    assert sections.select({"build"}, "cpu", False) == ([], parts)
    assert sections.select({"e2e", "hostcost"}, "cpu", None) == (["hostcost", "e2e"], parts)
    with pytest.raises(ValueError, match="nope"):
        sections.select({"nope"}, "cpu", None)


def test_an_optional_section_whose_module_is_missing_is_not_available():
    missing = sections.Section("x", "bench.no_such_module:run", "", optional=True)
    assert sections.resolve(missing).startswith("not available")
    with pytest.raises(ModuleNotFoundError):
        sections.resolve(sections.Section("x", "bench.no_such_module:run", ""))
    assert callable(sections.resolve(sections.BY_NAME["hostcost"]))


def test_the_e2e_section_runs_bench_e2e_on_the_bench_s_device(monkeypatch):
    """`python -m bench --only e2e` runs bench.e2e's command on the bench's device (its section was once its
    `run(args)`, called with the bench's context: an AttributeError)."""
    from types import SimpleNamespace

    from bench import e2e

    seen = []
    monkeypatch.setattr(e2e, "main", lambda argv: seen.append(argv) or 0)
    fn = sections.resolve(sections.BY_NAME["e2e"])
    assert fn(SimpleNamespace(device="cpu", quick=False)) == 0 and fn(SimpleNamespace(device="cuda", quick=True)) == 0
    assert seen == [["--device", "cpu"], ["--device", "cuda", "--repeats", "1"]]
    assert e2e.parse_args(seen[1]).repeats == 1  # arguments bench.e2e accepts


# --- implementations (small shapes on the CPU) -------------------------------------------------------

def _quick_timer(fns):
    return time_cpu(fns, 0.01, rounds=1)


@pytest.mark.parametrize("case", [Case("cpu", "mlp", "mlp", "fp32", "nk", 2, 1, 64, 96),
                                  Case("cpu", "rmsnorm", "pre_rms_norm", "fp32", "nk", 1, 3, 72, 72)])
def test_new_op_rows_run_without_the_op(case):
    """Until dsinf has MLPGemmOp / PreRMSNormOp, ours reads "not available"; torch's chains pass the check."""
    row = run_case(case, Env("cpu"), _quick_timer)
    assert not row.note
    torch_impls = [n for n in row.impls if n != "ours"]
    assert torch_impls and all(row.impls[n].status == "ok" and row.us(n) for n in torch_impls)
    ours = row.impls["ours"]
    assert ours.status == "ok" or (ours.status == "n/a" and ours.reason.startswith("not available: dsinf has no"))


@pytest.mark.parametrize("case", [
    Case("cuda", "int8", "vector_matmul", "fp16", "int8", 4, 1, 64, 96),
    Case("cuda", "decode", "vector_matmul", "fp16", "kn", 1, 1, 64, 96),
    Case("cuda", "prefill", "linear", "fp16", "nk", 1, 16, 64, 96),
    Case("cuda", "qkv", "qkv", "fp16", "kn", 2, 1, 256, 768, 2, 128, 100),
], ids=lambda c: c.part)
def test_cuda_plan_implementations_check_against_the_reference(case):
    """The CUDA plan's torch peers, on CPU tensors: each passes the reference check; ours and Triton
    (not loaded here) read n/a with the reason, never crash."""
    row = run_case(case, Env("cuda", device="cpu"), _quick_timer)
    assert not row.note
    assert row.impls["torch"].status == "ok"
    assert row.impls["ours"].status == "n/a" and row.impls["triton"].status == "n/a"


def test_int8_prefill_peers_are_int8_weight_only_paths():
    """An int8 row at a prompt's M: torch's eager int8 weight-only chain and the 16-bit-weight matmul pass the
    reference check on CPU tensors; our paths read n/a without the module; the 16-bit weights (float_w) are
    shown but never judged as a peer of int8 weights; aten's CUDA int8 kernel (one thread per output) is not
    timed at prompt sizes, and says why."""
    case = Case("cuda", "int8prefill", "vector_matmul", "fp16", "int8", 1, 48, 64, 96)
    row = run_case(case, Env("cuda", device="cpu"), _quick_timer)
    assert not row.note
    assert row.impls["torch"].status == "ok" and row.impls["float_w"].status == "ok"
    assert row.impls["ours"].status == "n/a" and "gemm" not in row.impls
    assert row.impls["aten_int8"].status == "n/a" and "one thread per output" in row.impls["aten_int8"].reason
    assert "float_w" not in goals.TORCH_PEERS and {"torch", "aten_int8"} <= set(goals.TORCH_PEERS)


def test_cpu_int8_peer_is_aten_with_bf16_activations():
    env = Env("cpu")
    _, bf16 = build_impls(Case("cpu", "int8", "vector_matmul", "bf16", "int8", 1, 1, 64, 48), env)
    _, fp32 = build_impls(Case("cpu", "int8", "vector_matmul", "fp32", "int8", 1, 1, 64, 48), env)
    assert set(bf16) == {"ours", "torch", "dense"} and set(fp32) == {"ours", "torch"}
    assert isinstance(bf16["ours"], Unavailable)  # the module was not loaded in this Env
    assert bf16["torch"].fn(0).dtype == torch.bfloat16
    row = run_case(Case("cpu", "int8", "vector_matmul", "bf16", "int8", 1, 1, 64, 48), env, _quick_timer)
    assert row.impls["torch"].status == "ok" and row.impls["dense"].status == "ok"


def test_host_cost_reports_a_call_left_without_a_pair(monkeypatch):
    """A baseline that fails leaves its calls unpaired (and a baseline whose calls all fail, untimed): those
    rows say why instead of the section failing on an empty sample list."""
    from bench import host_cost

    def broken():
        raise RuntimeError("no kernel")

    one = torch.ones(3)
    ok = lambda: one  # noqa: E731
    monkeypatch.setattr(host_cost, "calls", lambda device: [
        ("base ok", "", ok, one), ("ours", "base ok", ok, one),
        ("base broken", "", broken, one), ("ours without base", "base broken", ok, one),
        ("lonely base", "", ok, one), ("ours broken", "lonely base", broken, one)])
    res, _ = host_cost.measure("cpu", 2, 2)
    assert "diff_us" in res["ours"] and "us" in res["base ok"]
    assert res["base broken"]["why"].startswith("RuntimeError") and res["ours broken"]["why"].startswith("RuntimeError")
    assert "why" in res["ours without base"] and "why" in res["lonely base"]


def test_host_cost_checks_every_call_against_the_reference_before_timing_it():
    """Every call the section times computes the 64x64 linear dsinf.reference computes (the calls were only
    run once to catch exceptions); a wrong one is reported, not timed."""
    from bench import host_cost

    entries = host_cost.calls("cpu")
    assert len(entries) == 6 and all(want is not None for _, _, fn, want in entries if not isinstance(fn, str))
    for name, _, fn, want in entries:
        if not isinstance(fn, str):
            got = fn()
            torch.testing.assert_close(got[0] if isinstance(got, list) else got, want, rtol=1e-4, atol=1e-4)
    wrong = [(n, base, (lambda fn=fn: fn() * 1.1) if n.startswith("VectorMatMulOp") else fn, want)
             for n, base, fn, want in entries]
    res, _ = host_cost.measure_entries(wrong, "cpu", 2, 2)
    (name,) = [n for n in res if n.startswith("VectorMatMulOp")]
    assert res[name]["why"].startswith("FAIL: rel err") and "us" in res["F.linear"]


# --- routes: the CUDA rows as a user runs them ------------------------------------------------------------

def test_routes_step_off_or_nothing_to_route(monkeypatch, capsys):
    """DSINF_ROUTES=off: no tuning, the rows say so; a plan without decode/int8 rows tunes nothing."""
    from bench import routes_step
    from bench.context import Context

    ctx = Context.__new__(Context)  # tune() only calls ctx.note on a failure, which these cases never reach
    decode = [Case("cuda", "decode", "vector_matmul", "fp16", "kn", 1, 1, 64, 96)]
    monkeypatch.setenv("DSINF_ROUTES", "off")
    assert routes_step.tune(ctx, decode) is False
    assert "DSINF_ROUTES=off" in capsys.readouterr().out
    monkeypatch.delenv("DSINF_ROUTES")
    assert routes_step.tune(ctx, [Case("cuda", "prefill", "linear", "fp16", "nk", 1, 16, 64, 96)]) is False
    assert routes_step.forced_gemv(Case("cpu", "decode", "vector_matmul", "fp32", "kn", 1, 1, 64, 96), print) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_forced_gemv_runs_our_kernel_where_the_route_picks_cublas(tmp_path, monkeypatch):
    """A shape routed to cuBLAS at M=1: the plain op takes ATen, the bench's "gemv" wrapper takes our
    GEMV for that call only (the table is restored), and a shape routed to our GEMV gets no wrapper."""
    from bench import routes_step
    from dsinf import routes

    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    b = routes.binding("cuda")
    op = torch.ops.dsinf.vector_matmul_fp16
    K, N = 256, 384
    case = Case("cuda", "decode", "vector_matmul", "fp16", "kn", 1, 1, K, N)
    key = routes.RouteKey("fp16", "kn", K, N)
    x = torch.randn(1, 1, K, device="cuda", dtype=torch.float16)
    w = torch.randn(K, N, device="cuda", dtype=torch.float16) / K ** 0.5
    saved = dict(b.applied)
    try:
        b.set({**saved, key: 0})  # cuBLAS for every M
        gemv = routes_step.forced_gemv(case, op)
        assert gemv is not None
        want = op(x, w, False, None, False, False)
        assert b.last() == "aten"
        got = gemv(x, w, False, None, False, False)
        assert b.last() == "gemv" and b.applied == {**saved, key: 0}
        torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)
        b.set({**saved, key: b.gemv_cap})  # our GEMV for every M it takes
        assert routes_step.forced_gemv(case, op) is None
    finally:
        b.set(saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_timer_reads_the_same_calls_as_even():
    """Two names for the same calls read the same per-call time: neither side's batch counts a graph launch
    onto an idle GPU. Short batches (0.1 ms, about eight 4096x4096 decode calls) make a launch gap of a few
    µs a bias of several percent; the spread allowed is 3%."""
    from bench.timing import CudaTimer

    K, copies = 4096, 4  # 128 MiB: more than twice the L2 of the GPUs this runs on
    ws = [torch.randn(K, K, device="cuda", dtype=torch.float16) for _ in range(copies)]
    x = torch.randn(1, 1, K, device="cuda", dtype=torch.float16)

    def call(i):
        return torch.matmul(x, ws[i])

    t = CudaTimer(batch_ms=0.1, reps=15).measure({"first": (call, copies), "second": (call, copies)})
    assert t["first"].method == t["second"].method == "graph"
    assert 0.97 <= t["first"].us / t["second"].us <= 1.03, (t["first"], t["second"])


# --- end to end -------------------------------------------------------------------------------------------

def test_quick_cpu_run_of_a_cheap_section(tmp_path, cpu_module):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "bench", "--device", "cpu", "--quick", "--only", "hostcost",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "min ratio (torch/ours)" in p.stdout and "== summary ==" in p.stdout
    data = json.loads(out.read_text())
    calls = data["host_cost"]["cpu"]
    assert len(calls) == 6 and all("us" in d for d in calls.values()), calls
    assert [g["key"] for g in data["goals"]] == [g.key for g in GOALS]
    host = next(g for g in data["goals"] if g["key"] == "host.cpu")
    assert host["status"] in ("PASS", "MISS", "noisy") and host["value"] is not None


def test_defines_reach_only_the_cuda_build():
    """bench.defines (the probe's and bench.e2e's --define): the flags go to the CUDA variant's compile
    lines, host and device, and so into its build key; the CPU variant and a plain builder are untouched."""
    from bench.defines import with_defines
    from dsinf.builder import InferenceBuilder
    from op_builder.archs import parse_arch_list

    archs = parse_arch_list("9.0")
    plain = InferenceBuilder().spec("cuda", archs=archs)
    spec = with_defines(InferenceBuilder(), ["DSINF_NK_STREAM_PDL=0", "DSINF_I8_STAGES=3"]).spec("cuda", archs=archs)
    for flags in (spec.cuda_cflags, spec.cflags):
        assert "-DDSINF_NK_STREAM_PDL=0" in flags and "-DDSINF_I8_STAGES=3" in flags
    assert not any("DSINF_NK_STREAM_PDL" in f for f in plain.cuda_cflags + plain.cflags)
    cpu = with_defines(InferenceBuilder(), ["DSINF_I8_STAGES=3"]).spec("cpu")
    assert not any("DSINF_I8_STAGES" in f for f in cpu.cflags)


def test_e2e_define_needs_the_cuda_device(capsys):
    from bench import e2e

    assert e2e.main(["--device", "cpu", "--define", "DSINF_NK_STREAM_PDL=0"]) == 2
    assert "--define builds the CUDA module" in capsys.readouterr().err


def test_gpu_test_shards_cover_every_test_file_once():
    """bench/gpu_test_shards.sh's groups (the GPU suite as parallel processes) hold every test file exactly
    once, so a new file is never left out of a GPU run."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", "bench/gpu_test_shards.sh", "--list"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    groups = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert list(groups)[-2:] == ["rest", "timed"] and len(groups) >= 4
    files = [f for fs in groups.values() for f in fs]
    assert sorted(files) == sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py"))
    assert groups["timed"] == ["tests/test_routes.py"]


def test_e2e_rows_carry_the_spread_of_their_repeats(tmp_path, cpu_module, capsys):
    """bench.e2e on the CPU (tiny model, one layer): each row's median lies inside its range (the fastest and
    slowest repeat), the table prints the ranges, and the JSON keeps them."""
    from bench import e2e

    path = tmp_path / "e2e.json"
    assert e2e.main(["--device", "cpu", "--layers", "1", "--variants", "hf,dsinf", "--modes", "eager",
                     "--batch", "1", "--prompt", "8", "--new", "4", "--repeats", "3", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    rows, host = doc["rows"], doc["meta"]["host"]
    assert host["before"]["cores"] == os.cpu_count() and host["after"]["load_avg"] >= 0
    assert [r["variant"] for r in rows] == ["hf", "dsinf"]
    for r in rows:
        lo, hi = r["decode_tok_s_range"]
        assert 0 < lo <= r["decode_tok_s"] <= hi, r
        lo, hi = r["ttft_ms_range"]
        assert 0 < lo <= r["ttft_ms"] <= hi, r
    out = capsys.readouterr().out
    assert "range" in out.split("\n-")[0] and "medians of 3 repeats" in out and "host: load " in out


def test_e2e_checks_the_tokens_of_the_static_mode_it_times(tmp_path, cpu_module):
    """The static rows time dsinf's static-cache decode (CUDA graphs on a GPU), whose tokens the eager
    accuracy check never saw: each variant's batch-1 static greedy tokens are compared with its eager ones,
    and the goal wants no fewer agreeing than hf's own static decode."""
    from bench import e2e

    path = tmp_path / "e2e.json"
    assert e2e.main(["--device", "cpu", "--layers", "1", "--variants", "hf,dsinf", "--modes", "eager,static",
                     "--batch", "1", "--prompt", "8", "--new", "2", "--repeats", "1", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    static = {r["variant"]: r for r in doc["rows"] if r["mode"] == "static"}
    assert static["hf"]["greedy_vs_eager"] == static["dsinf"]["greedy_vs_eager"] == e2e.AGREEMENT_TOKENS
    [goal] = [g for g in doc["goals"] if g["goal"].startswith("dsinf static greedy tokens")]
    assert goal["pass"] and goal["target"] == e2e.AGREEMENT_TOKENS
    args = e2e.parse_args(["--device", "cpu", "--modes", "static"])
    broken = [{**static["hf"], "ratio_vs_hf": 1.0}, {**static["dsinf"], "greedy_vs_eager": 3, "ratio_vs_hf": 2.0}]
    [goal] = [g for g in e2e.goals(broken, {}, args) if g["goal"].startswith("dsinf static greedy tokens")]
    assert goal["value"] == 3 and not goal["pass"]


def test_e2e_static_tokens_may_part_only_at_a_near_tie():
    """The static-token check's one excuse (bench.e2e.near_tie): the first difference is a near-tie - both modes'
    logits within 1% of each other up to and at it (on an H100 the int8 model's static and eager steps were 5e-3
    apart and parted at a top-2 gap of one fp16 ulp). A mode that computes something else, or parts where its
    logits moved by more, still fails."""
    import argparse

    from bench import e2e

    gen = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(4, 50, generator=gen) * 3
    ref_logits[2, 7], ref_logits[2, 9] = 8.000, 7.996  # eager picks 7, by 4e-3
    ref_tokens = ref_logits.argmax(-1)
    noise = torch.randn(4, 50, generator=gen) * 0.01  # the modes' rounding: rel err ~3e-3
    logits = ref_logits + noise
    logits[2, 7], logits[2, 9] = 7.997, 8.003  # static picks 9, by 6e-3: inside twice the logits' difference
    tokens = logits.argmax(-1)
    assert e2e.agreement(tokens, ref_tokens) == 2
    step, margin, apart, worst = e2e.near_tie((tokens, logits), (ref_tokens, ref_logits))
    assert step == 2 and margin == pytest.approx(6e-3, abs=1e-5) and margin <= 2 * apart and worst < 1e-2
    assert e2e.near_tie((ref_tokens, ref_logits), (ref_tokens, ref_logits)) is None  # no difference
    clear = logits.clone()
    clear[2, 9] = 9.0  # parts by 1.0, its logits 5% from eager's there: no tie
    assert e2e.near_tie((clear.argmax(-1), clear), (ref_tokens, ref_logits)) is None
    off = logits * 1.1  # a mode that computes something else (10% off) parts at a tie it made itself
    assert e2e.near_tie((off.argmax(-1), off), (ref_tokens, ref_logits)) is None
    args = argparse.Namespace(modes=["static"], dtype="fp16")
    rows = [{"variant": "hf", "mode": "static", "batch": 1, "greedy_vs_eager": 32, "ratio_vs_hf": 1.0,
             "decode_tok_s": 90.0},
            {"variant": "dsinf-int8", "mode": "static", "batch": 1, "greedy_vs_eager": 7, "ratio_vs_hf": 2.0,
             "decode_tok_s": 180.0,
             "greedy_tie": {"step": 7, "margin": 7.8e-3, "logits_apart": 2e-2, "rel_err": 5e-3}}]
    [goal] = [g for g in e2e.goals(rows, {}, args) if "static greedy" in g["goal"]]
    assert goal["pass"] and goal["value"] == 7 and "then a near-tie" in goal["goal"]
    del rows[1]["greedy_tie"]
    [goal] = [g for g in e2e.goals(rows, {}, args) if "static greedy" in g["goal"]]
    assert not goal["pass"]


def _e2e_accuracy_run(tmp_path, dtype: str, variants: str) -> dict:
    """bench.e2e's JSON for a one-layer tiny model on the CPU, eager, batch 1, 2 new tokens: its accuracy rows."""
    from bench import e2e

    path = tmp_path / "e2e.json"
    assert e2e.main(["--device", "cpu", "--layers", "1", "--dtype", dtype, "--variants", variants,
                     "--modes", "eager", "--batch", "1", "--prompt", "8", "--new", "2", "--repeats", "1",
                     "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_e2e_measures_int8_against_its_own_model_in_fp32(tmp_path, cpu_module):
    """bench.e2e's int8 accuracy goal compares against the int8 model itself in fp32 (unrounded w_int8 * scale,
    fp32 arithmetic), beside torch on the fp16-dequantized weights against the same model: in fp16 both differ
    from it (rounding), and both stay close. Its target is 1% or torch's own error there, whichever is larger
    (bf16 puts torch itself near 7% on the 32-layer model)."""
    from bench import e2e

    doc = _e2e_accuracy_run(tmp_path, "fp16", "hf,dsinf-int8")
    acc = doc["accuracy"]["dsinf-int8"]
    assert 0 < acc["rel_err_vs_int8_fp32"] < 1e-2 and 0 < acc["dequantized_rel_err_vs_int8_fp32"] < 1e-2, acc
    [goal] = [g for g in doc["goals"] if g["goal"] == "dsinf-int8 logits rel err vs its int8 model in fp32"]
    assert goal["value"] == acc["rel_err_vs_int8_fp32"] and goal["pass"]
    assert goal["target"] == max(1e-2, acc["dequantized_rel_err_vs_int8_fp32"]) == 1e-2
    rows = {"dsinf-int8": {**acc, "rel_err_vs_int8_fp32": 0.058, "dequantized_rel_err_vs_int8_fp32": 0.070}}

    def bf16_goal():
        goals = e2e.goals([], rows, argparse.Namespace(modes=[], dtype="bf16"))
        return next(g for g in goals if "int8 model" in g["goal"])

    assert bf16_goal()["target"] == 0.070 and bf16_goal()["pass"]  # within torch's own bf16 error
    rows["dsinf-int8"]["rel_err_vs_int8_fp32"] = 0.071
    assert not bf16_goal()["pass"]


def test_e2e_measures_dsinf_and_hf_against_the_same_weights_in_fp32(tmp_path, cpu_module):
    """bench.e2e's fp accuracy goal: dsinf's logits against the same weights computed in fp32, beside HF's own
    error there; the target is 1% or HF's own error, whichever is larger (bf16 puts HF itself above 1% on two
    Llama-3-8B layers, where dsinf against HF read 1.3e-2 and failed a bare 1%)."""
    from bench import e2e

    doc = _e2e_accuracy_run(tmp_path, "bf16", "hf,dsinf")
    acc = doc["accuracy"]["dsinf"]
    # bf16 against fp32: both off by rounding (never 0), both a rounding's size (well under 5%)
    assert 0 < acc["rel_err_vs_fp32"] < 5e-2 and 0 < acc["hf_rel_err_vs_fp32"] < 5e-2, acc
    [goal] = [g for g in doc["goals"] if g["goal"] == "dsinf logits rel err vs the same weights in fp32"]
    assert goal["value"] == acc["rel_err_vs_fp32"]
    assert goal["target"] == max(1e-2, acc["hf_rel_err_vs_fp32"])
    rows = {"dsinf": {**acc, "rel_err_vs_fp32": 0.013, "hf_rel_err_vs_fp32": 0.0133}}

    def fp_goal():
        goals = e2e.goals([], rows, argparse.Namespace(modes=[], dtype="bf16"))
        return next(g for g in goals if g["goal"].startswith("dsinf logits"))

    assert fp_goal()["target"] == 0.0133 and fp_goal()["pass"]  # within HF's own bf16 error
    rows["dsinf"]["rel_err_vs_fp32"] = 0.0134
    assert not fp_goal()["pass"]
    rows["dsinf"].update(rel_err_vs_fp32=0.011, hf_rel_err_vs_fp32=0.004)  # fp16-like: the 1% floor holds
    assert fp_goal()["target"] == 1e-2 and not fp_goal()["pass"]


def test_the_kn_gemm_probe_times_both_gemms_checked(cpu_module, capsys):
    """`python -m bench.kn_gemm`: one row per shape with one ratio per M, on small shapes (a run of the real
    module, both GEMMs checked against the reference before they are timed)."""
    from bench import kn_gemm

    assert kn_gemm.main(["--shapes", "96x200,64x300", "--m", "16,40", "--min-time", "0.02"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith(("96x200", "64x300"))]
    assert len(rows) == 2 and all(len(re.findall(r"M=\d+ \d+\.\d\dx \(\d+ GF/s\)", r)) == 2 for r in rows), out
    assert kn_gemm.main(["--shapes", "96x200", "--m", "16", "--min-time", "0.02", "--gemv"]) == 0  # + the GEMV
    assert re.search(r"M=16 \d+\.\d\dx \(\d+ GF/s\) gemv \d+\.\d\d", capsys.readouterr().out)


def test_the_int8_cpu_probe_times_every_path_checked(cpu_module, capsys):
    """`python -m bench.int8_cpu`: one row per shape and M with every path's time and ratio and the rule's path,
    on small shapes (a run of the real module, each of its paths checked against the reference first)."""
    from bench import int8_cpu
    from dsinf import routes

    assert int8_cpu.main(["--shapes", "96x200", "--m", "1,2,17", "--min-time", "0.02"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("96x200")]
    assert len(rows) == 3, out
    for row in rows:
        timed = 4 if re.search(r"amx +- ", row) else 5  # the tiles only where they run (M >= 2, an AMX host)
        assert len(re.findall(r"(amx|gemv|deq|dense|int8pack) +\d+ \(\d+\.\d\dx\)", row)) == timed, row
    untimed = [bool(re.search(r"amx +- ", row)) for row in rows]
    assert untimed == [True, not routes.binding("cpu").amx_gemv(), not routes.binding("cpu").amx_gemv()], out
    binding = routes.binding("cpu")
    crossover = binding.default(routes.RouteKey("bf16", "int8", 96, 200))  # what the host's rule takes
    want = ["amx" if binding.amx_gemv() and 2 <= m <= 256 else "deq" if m > crossover else "gemv" for m in (1, 2, 17)]
    assert [row.rsplit("rule: ", 1)[1] for row in rows] == want, out
