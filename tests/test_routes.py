"""dsinf.routes: the measured GEMV/ATen routes - the decision, the persisted table, the binding honouring a
route, measurement, and when inject measures. CPU tests use the real compiled CPU module; GPU tests are
marked `gpu` (the H200 numbers behind them: docs/PERFORMANCE.md)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time

import pytest
import torch
from torch import nn

import dsinf
from dsinf import routes
from dsinf.inject import InjectedLinear
from dsinf.quantize import quantize_int8
from dsinf.config import ActivationFuncType, NormType
from dsinf.routes import Binding, Route, RouteKey
from op_builder import knobs

gpu = pytest.mark.gpu


@pytest.fixture
def cpu_routes(cpu_module, tmp_path, monkeypatch):
    """The CPU module's route table, emptied for the test and restored after; a private table file."""
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(routes, "_measured", {})  # nothing measured by an earlier test is reused
    b = routes.binding("cpu")
    saved, saved_routes = dict(b.applied), dict(b.routes)
    b.set({})
    b.routes.clear()
    yield b
    b.set(saved)
    b.routes.clear()
    b.routes.update(saved_routes)


def _route(key, max_m=0, **kw):
    return Route(key, max_m, 24, (1, 2), (1.0, 2.0), (1.5, 1.5), "t", **kw)


# --- the decision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ours, aten, want", [
    ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 4),    # ours wins everywhere
    ((1.0, 1.0, 1.0), (1.01, 1.01, 1.0), 0),  # 1% wins and a draw are ties: torch
    ((1.0, 1.0, 1.0), (1.01, 2.0, 2.0), 4),   # a tie below clear wins goes with them
    ((1.0, 1.0, 1.0), (1.01, 1.03, 0.9), 0),  # ... but not with a narrow one: the first tie stops it
    ((1.0, 1.0, 1.0), (1.01, 1.01, 1.06), 4),  # two ties below a clear win at 4 go with it
    ((1.0, 1.0, 1.0), (1.03, 1.01, 1.03), 1),  # a narrow win at 1, a tie, a narrow win: stops at the tie
    ((1.0, 1.0, 1.0), (1.5, 1.01, 1.0), 1),   # ties above the last win stay with torch
    ((1.0, 1.0, 1.0), (1.03, 1.03, 0.5), 2),  # loses at 4
    ((1.0, 1.0, 1.0), (1.5, 0.9, 1.5), 1),    # stops at the first loss, even if it wins again later
    ((1.0, 1.0, 1.0), (1.5, 0.99, 1.5), 4),   # a tie between clear wins goes with them
    ((1.0, 1.0, 1.0), (0.99, 2.0, 2.0), 4),   # a 1% loss is a tie: it goes with the clear wins above it
    ((1.0, 1.0, 1.0), (0.99, 1.03, 1.03), 0),  # ... but not with narrow ones
    ((1.0, 1.0, 1.0), (0.97, 2.0, 2.0), 0),   # a 3% loss at M=1 stops it
    ((1.0, 1.0, 1.0), (1.0, 1.01, 1.02), 0),  # H200 bf16 [N,K] 8192x8192 (run 43): ties only, torch
    ((2.0, 1.0, 1.0), (1.0, 2.0, 2.0), 0),
])
def test_decide(ours, aten, want):
    assert routes.decide((1, 2, 4), ours, aten) == want
    if want:  # a win from the smallest M is the span's: it starts there
        assert routes.decide_span((1, 2, 4), ours, aten) == (1, want)


@pytest.mark.parametrize("aten, want", [
    ((2.0, 2.0, 2.0, 2.0), (1, 8)),      # wins from M=1: decide's own
    ((0.96, 1.5, 1.7, 1.8), (2, 8)),     # Xeon fp32 [K,N] 4096x11008: MKL's GEMV wins at M=1, ours above it
    ((0.5, 0.9, 1.5, 1.5), (4, 8)),      # two losses, then wins
    ((0.96, 1.01, 1.5, 1.5), (2, 8)),    # a loss, then a tie that rides along with a clear win
    ((0.96, 1.01, 1.03, 0.9), (4, 4)),   # ... but not with a narrow one: the span starts at the win itself
    ((1.01, 1.03, 1.5, 1.5), (2, 8)),    # a tie at M=1 before a narrow win no longer ends it all at M=1
    ((0.96, 1.5, 0.9, 1.5), (2, 2)),     # a loss after the start still stops it
    ((0.96, 1.01, 1.0, 0.5), (1, 0)),    # losses and ties only: ATen for every M
    ((1.0, 1.0, 1.0, 1.03), (8, 8)),     # ties below a narrow win at the top: the win alone
])
def test_decide_span_starts_past_smaller_ms_where_aten_is_faster(aten, want):
    """min_m is the first bucket from which `decide` finds a win; the buckets below it went to ATen (a loss or a
    tie each), and `decide`'s rules (a tie rides along only with a clear win, a loss stops it) hold above it."""
    ours = (1.0,) * 4
    assert routes.decide_span((1, 2, 4, 8), ours, aten) == want
    assert routes.decide_key(RouteKey("fp32", "kn", 8, 8), (1, 2, 4, 8), ours, aten) == want
    lo, hi = want
    for m, a in zip((1, 2, 4, 8), aten):
        if m < lo:  # below the span: ATen was faster, or the two tied
            assert not a > 1 + routes.MARGIN


@pytest.mark.parametrize("gated, matmul, want", [
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 4),  # ties: the gated kernel (one launch) everywhere
    ((1.0, 1.0, 1.0), (1.01, 0.99, 1.0), 4),  # within the margin either way: still ties
    ((1.0, 1.0, 1.0), (0.97, 1.2, 1.2), 0),  # the matmul wins at M=1: the matmul for every M
    ((1.0, 1.0, 1.0), (1.1, 1.05, 0.9), 2),  # ... from the first M where it wins
    ((1.0, 1.0, 1.0), (1.2, 0.9, 1.2), 1),  # a later gated win does not reach past a matmul win
])
def test_decide_gated_sends_ties_to_the_gated_kernel(gated, matmul, want):
    assert routes.decide_gated((1, 2, 4), gated, matmul) == want
    assert routes.decide_key(RouteKey("fp16", "gated-nk", 8, 8), (1, 2, 4), gated, matmul) == (1, want)
    assert routes.decide_key(RouteKey("fp16", "nk", 8, 8), (1, 2, 4), gated, matmul) == routes.decide_span(
        (1, 2, 4), gated, matmul)


def test_buckets_cover_the_compiled_crossover_and_stop_at_the_gemv_limit():
    assert routes.buckets(16, 8) == (1, 2, 4, 8, 16)
    assert routes.buckets(2**62, 24) == (1, 2, 4, 8, 16, 24, 32, 64)
    assert routes.buckets(4, 8) == (1, 2, 4)
    # an int8-gemm key: from the GEMV's top M to a long prompt's, with its compiled crossover
    assert routes.buckets(routes.INT8_GEMM_LIMIT, 512, gemm=True) == routes.GEMM_BUCKETS
    assert routes.buckets(routes.INT8_GEMM_LIMIT, 0, gemm=True) == routes.GEMM_BUCKETS
    assert routes.buckets(routes.INT8_GEMM_LIMIT, 384, gemm=True) == (16, 32, 64, 128, 256, 384, 512, 1024, 2048)


@pytest.mark.parametrize("gemm, dequant, want", [
    ((1.0, 1.0, 1.0), (1.5, 1.03, 1.1), 4),   # wins by more than the margin at every bucket: the GEMM
    ((1.0, 1.0, 1.0), (1.5, 1.01, 1.5), 1),   # a tie stops it (H100 fp16 4096x4096 M=512: 1.02-1.03x measured,
                                              # 0.96-1.00x in a second timing), whatever wins above it
    ((1.0, 1.0, 1.0), (1.5, 1.04, 0.99), 2),  # H200 fp16 4096x4096 M=512 (run 122): a 1% loss stops it
    ((1.0, 1.0, 1.0), (2.0, 1.5, 0.9), 2),   # dequantize + cuBLAS wins from M=4
    ((1.0, 1.0, 1.0), (1.01, 2.0, 2.0), 0),  # ... or ties at the first bucket: dequantize for every M
    ((1.0, 1.0, 1.0), (0.5, 2.0, 2.0), 0),   # ... or wins there
])
def test_an_int8_gemm_key_stops_at_its_first_tie_or_loss(gemm, dequant, want):
    key = RouteKey("bf16", routes.INT8_GEMM, 4096, 4096)
    assert key.weight == "int8" and RouteKey("bf16", "gated-nk", 8, 8).weight == "nk"
    assert routes.decide_key(key, (1, 2, 4), gemm, dequant) == (1, want)  # from the smallest M, whatever it read
    # a gated key keeps the ties (the one launch wins ties at decode sizes)
    assert routes.decide_key(RouteKey("bf16", "gated-nk", 8, 8), (1, 2, 4), (1.0, 1.0, 1.0), (1.5, 1.01, 0.99)) == (
        1, 4)


@pytest.mark.parametrize("bad", [("fp8", "kn", 4, 4), ("fp16", "tn", 4, 4), ("fp16", "kn", 0, 4),
                                 ("fp16", "kn", 4, True), ("fp16", "kn", 2**63, 4), ("fp16", "kn", 4, 2**64 + 64)])
def test_route_key_rejects_bad_fields(bad):
    with pytest.raises(ValueError, match="routes:"):
        RouteKey(*bad)


# --- the persisted table -----------------------------------------------------------------------------

def test_table_round_trip(tmp_path):
    path = tmp_path / "routes.json"
    a, b = RouteKey("fp16", "kn", 4096, 12288), RouteKey("bf16", "int8", 64, 96)
    assert routes._save("dev-A", [_route(a, 0)], path)
    assert routes._save("dev-B", [_route(b, 2)], path)
    assert routes._save("dev-A", [_route(b, 1)], path)  # merged, not replacing dev-A's first entry
    tables = routes.read_tables(path)
    assert set(tables) == {"dev-A", "dev-B"}
    assert tables["dev-A"][a.text] == _route(a, 0) and tables["dev-A"][b.text].max_m == 1
    assert tables["dev-B"][b.text] == _route(b, 2)


def test_a_killed_writers_temp_file_is_removed_by_the_next_writer(tmp_path):
    """A writer killed between writing its temp file and renaming it leaves `.routes.json.<pid>.<hex>.tmp`;
    the route table's writers never removed them (the autotune table's did), so they piled up."""
    from op_builder.atomic import temp_name

    path = tmp_path / "routes.json"
    orphan = temp_name(path)
    orphan.write_text('{"half": ')
    assert routes._save("dev", [_route(RouteKey("fp16", "kn", 64, 96), 1)], path)
    assert not orphan.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"format": "other", "version": 1, "tables": {}}),
                                     json.dumps({"format": routes.FORMAT, "version": 99, "tables": {}}),
                                     json.dumps({"format": routes.FORMAT, "version": 1, "tables": []})])
def test_a_malformed_file_is_absent_with_one_warning(tmp_path, caplog, content):
    path = tmp_path / "routes.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="dsinf"):
        assert routes.read_tables(path) == {}
        assert routes.read_tables(path) == {}
    assert len([r for r in caplog.records if "route table" in r.getMessage()]) == 1


def test_a_malformed_entry_is_dropped_the_rest_kept(tmp_path, caplog):
    path = tmp_path / "routes.json"
    good = RouteKey("fp32", "nk", 8, 8)
    routes._save("dev", [_route(good, 1)], path)
    doc = json.loads(path.read_text())
    doc["tables"]["dev"]["fp32|nk|K=8|N=9"] = {"max_m": -1, "default_max_m": 8, "buckets": [], "ours_ms": [],
                                               "aten_ms": []}
    doc["tables"]["dev"]["garbage"] = {}
    written = doc["tables"]["dev"][good.text]
    assert written["min_m"] == 1 and written["max_m"] == 1
    for n, (lo, hi) in enumerate(((0, 4), (5, 4), (2, 0))):  # spans the binding would refuse
        doc["tables"]["dev"][f"fp32|nk|K=8|N={10 + n}"] = {**written, "min_m": lo, "max_m": hi}
    doc["tables"]["dev"]["fp32|nk|K=8|N=13"] = {k: v for k, v in written.items() if k != "min_m"}  # a v3 entry
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="dsinf"):
        tables = routes.read_tables(path)
    assert list(tables["dev"]) == [good.text]
    assert any("6 malformed entries dropped" in r.getMessage() for r in caplog.records)


def test_knob_values():
    assert knobs.KNOBS["DSINF_ROUTES"].default == "auto"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSINF_ROUTES", "sometimes")
        with pytest.raises(knobs.KnobError, match="DSINF_ROUTES"):
            knobs.get("DSINF_ROUTES")


# --- the binding honours the table --------------------------------------------------------------------

def test_route_zero_runs_aten_and_a_large_route_runs_our_gemv(cpu_routes):
    K, N = 4096, 64  # K long enough that the GEMV's summation order differs from MKL's
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(K, N, generator=gen), torch.randn(1, 4, K, generator=gen)
    op = torch.ops.dsinf.vector_matmul_fp32.default
    key = RouteKey("fp32", "kn", K, N)
    assert cpu_routes.default(key) >= 4  # the compiled crossover sends M=4 to our GEMV ...
    ours = op(x, w)
    assert cpu_routes.last() == "gemv" and not torch.equal(ours[0], torch.mm(x[0], w))
    cpu_routes.set({key: 0})  # ... the table sends it to ATen: torch's own sgemm (MKL or oneDNN), bit for bit
    with routes.fp32_gemm(False):
        out = op(x, w)
    assert cpu_routes.last() == "aten" and torch.equal(out[0], torch.mm(x[0], w))
    if torch.backends.mkldnn.is_available():
        with routes.fp32_gemm(True), routes.kn_gemm(False):  # (the host may take [K, N] to our GEMM: below)
            out = op(x, w)
        assert torch.equal(out[0], torch.ops.mkldnn._linear_pointwise(x[0], w.t(), None, "none", [], ""))
    with routes.kn_gemm(True):  # ATen's side of the route on our [K, N] GEMM
        before = cpu_routes.kn_gemm_calls()
        out = op(x, w)
        assert cpu_routes.last() == "aten" and cpu_routes.kn_gemm_calls() == before + 1
        torch.testing.assert_close(out, dsinf.reference.vector_matmul(x, w), rtol=1e-4, atol=1e-4)
    other = torch.randn(K, N + 8, generator=gen)  # another shape keeps the compiled crossover
    op(x, other)
    assert cpu_routes.last() == "gemv"
    x64 = torch.randn(2, 32, K, generator=gen)  # M = 64 > the compiled crossover: ATen ...
    op(x64, w)
    assert cpu_routes.last() == "aten"
    cpu_routes.set({key: 64})  # ... unless the table says ours
    got = op(x64, w)
    assert cpu_routes.last() == "gemv"
    torch.testing.assert_close(got, dsinf.reference.vector_matmul(x64, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_a_span_runs_our_gemv_inside_it_and_aten_outside(cpu_routes, layout, act):
    """A route (min_m, max_m) runs our GEMV for min_m <= M <= max_m and ATen below and above it (a wide [K, N]
    weight on an Intel Xeon: MKL's GEMV at M = 1, ours at 2..16); every M gives the reference's result."""
    K, N = 136, 72
    gen = torch.Generator().manual_seed(3)
    if layout == "int8":
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
        scale = torch.rand(N, generator=gen) * 0.01 + 0.001
    else:
        w, scale = (torch.randn((K, N) if layout == "kn" else (N, K), generator=gen) * 0.1).to(act), None
    op = getattr(torch.ops.dsinf, f"vector_matmul_{routes._DTYPES[act]}").default
    key = RouteKey(routes._DTYPES[act], layout, K, N)
    ms = (1, 2, 3, 5, 6, 7)
    with contextlib.ExitStack() as stack:
        if cpu_routes.amx_gemv():  # AMX tiles take int8 with bf16 activations at 2 <= M ahead of the route
            stack.enter_context(routes.amx_gemv(False))
        for span, inside in (((2, 6), {2, 3, 5, 6}), ((1, 3), {1, 2, 3}), ((5, 5), {5}), ((1, 0), set())):
            cpu_routes.set({key: span})
            assert [cpu_routes.runs_ours(key, m) for m in ms] == [m in inside for m in ms]
            for m in ms:
                x = torch.randn(1, m, K, generator=gen).to(act)
                got = op(x, w, False, scale, layout == "int8", layout != "kn")
                assert cpu_routes.last() == ("gemv" if m in inside else "aten"), (span, m)
                want = dsinf.reference.vector_matmul(x, w, False, scale, layout == "int8", layout != "kn")
                tol = 1e-5 if act == torch.float32 else 1e-2  # of the largest output: a few ulps of it
                torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("layout, K, N, want, want_onednn", [
    ("nk", 4096, 4096, 16, 8), ("nk", 4096, 256, 8, 8), ("nk", 256, 1376, 8, 8),  # [N,K]: 16; a short K or N: 8
    ("kn", 4096, 4096, 16, 8), ("kn", 1024, 512, 8, 8), ("kn", 4096, 64, 4, 4),   # [K,N]: 16 from N = 1024, else less;
])                                                                                # oneDNN caps them at 8 (our [K,N] GEMM: 16)
def test_cpu_fp32_compiled_crossover_falls_with_the_shape(cpu_routes, onednn, layout, K, N, want, want_onednn):
    """Without a route, fp32 runs our GEMV up to a crossover that falls on narrow outputs and short K (MKL
    catches up sooner there; docs/PERFORMANCE.md, "CPU GEMV / GEMM crossover"), and far sooner where the GEMM
    past it is oneDNN's (8: "CPU fp32 GEMM: oneDNN on AMD"), except [K, N] where our own GEMM runs past it
    there (16): the binding reports it and the op takes it, our GEMV at that M and ATen one above. Forced onto
    oneDNN, a torch without it keeps the MKL rule."""
    with routes.fp32_gemm(onednn):
        if layout == "kn" and N >= 1024 and cpu_routes.kn_gemm():
            want_onednn = 16  # our [K, N] GEMM past the GEMV, not oneDNN's: the GEMV keeps ahead of it to 16
        _fp32_crossover(cpu_routes, layout, K, N, want_onednn if onednn and torch.backends.mkldnn.is_available()
                        else want)
    if layout == "kn" and N >= 1024 and torch.backends.mkldnn.is_available():
        with routes.fp32_gemm(True), routes.kn_gemm(False):  # oneDNN's [K, N] GEMM past the GEMV: 8
            _fp32_crossover(cpu_routes, layout, K, N, 8)
        with routes.fp32_gemm(True), routes.kn_gemm(True):  # rms_mlp_gemm's gate|up keeps 8 over our GEMM
            assert cpu_routes.default(RouteKey("fp32", "gated-kn", K, N)) == 8


def _fp32_crossover(cpu_routes, layout, K, N, want):
    key = RouteKey("fp32", layout, K, N)
    assert cpu_routes.default(key) == want
    cpu_routes.set({})
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(*((N, K) if layout == "nk" else (K, N)), generator=gen)
    op = torch.ops.dsinf.vector_matmul_fp32.default
    for m, path in ((want, "gemv"), (want + 1, "aten")):
        op(torch.randn(1, m, K, generator=gen), w, False, None, False, layout == "nk")
        assert cpu_routes.last() == path, (key, m)


def test_the_native_bf16_gemm_is_the_hosts_choice_unless_overridden(cpu_routes):
    """bf16 past the GEMV runs torch's native bf16 GEMM exactly where the host has avx512_bf16 (torch's
    oneDNN GEMM, whatever ISA level this binary was built for), as the report's note says; routes.bf16_gemm
    overrides it both ways and restores it."""
    from dsinf.builder import host_native_bf16_gemm
    from op_builder.system import current_system

    host = host_native_bf16_gemm(current_system().cpu)  # the rule the report shows
    assert cpu_routes.native_bf16_gemm() == host
    _overrides_both_ways(routes.bf16_gemm, Binding.native_bf16_gemm)
    assert cpu_routes.native_bf16_gemm() == host


def _overrides_both_ways(choice, read):
    """`choice(on)` (a routes context manager) sets what `read(binding)` says, nested, and restores it."""
    for on in (False, True):
        with choice(on) as b:
            assert read(b) == on
            with choice(not on):
                assert read(b) == (not on)
            assert read(b) == on


def test_the_amx_rule_is_the_hosts_choice_unless_overridden(cpu_routes):
    """The bf16 crossovers take the AMX rule exactly where the host has AMX tiles and the native bf16 GEMM (torch's
    oneDNN GEMM runs on them), as the report's note says; routes.amx_bf16 overrides it both ways and restores
    it."""
    from dsinf.builder import InferenceBuilder, host_amx_bf16
    from op_builder.system import current_system

    host = host_amx_bf16(current_system().cpu)  # the rule the report shows
    assert cpu_routes.amx_bf16() == host
    notes = " ".join(InferenceBuilder().compatible("cpu").notes)
    assert ("on AMX tiles here" in notes) == host
    assert ("our kernel on AMX tiles" in notes) == cpu_routes.amx_gemv()  # int8 on the tiles: an avx512_bf16 build
    if cpu_routes.amx_gemv():  # forced on, a host without the tiles keeps the GEMV
        _overrides_both_ways(routes.amx_gemv, Binding.amx_gemv)
    _overrides_both_ways(routes.amx_bf16, Binding.amx_bf16)
    assert cpu_routes.amx_bf16() == host


def test_the_fp32_gemm_is_the_hosts_choice_unless_overridden(cpu_routes):
    """fp32 past the GEMV runs oneDNN's GEMM exactly where the host is an AMD CPU and torch has oneDNN (MKL's
    AMD code path ran 1.1-2.6x slower there), as the report's note says; routes.fp32_gemm overrides it both
    ways and restores it."""
    from dsinf.builder import host_onednn_fp32_gemm
    from op_builder.system import current_system

    host = host_onednn_fp32_gemm(current_system().cpu)  # the rule the report shows
    assert cpu_routes.onednn_fp32_gemm() == host
    for onednn in (False, True):
        with routes.fp32_gemm(onednn) as b:
            assert b.onednn_fp32_gemm() == (onednn and torch.backends.mkldnn.is_available())
            with routes.fp32_gemm(not onednn):
                assert b.onednn_fp32_gemm() == (not onednn and torch.backends.mkldnn.is_available())
    assert cpu_routes.onednn_fp32_gemm() == host


def test_the_kn_gemm_is_the_hosts_choice_unless_overridden(cpu_routes):
    """Float [K, N] weights past the GEMV run our GEMM exactly where this build is AVX-512 and fp32 runs on
    oneDNN, as the report's note says; routes.kn_gemm overrides it both ways, whatever fp32_gemm picks, and
    restores it."""
    from dsinf.builder import InferenceBuilder, host_kn_gemm
    from op_builder.system import current_system

    isa = InferenceBuilder().spec("cpu").manifest_extra["isa"]  # what the session's module was built for
    host = host_kn_gemm(current_system().cpu, isa)  # the rule the report shows
    assert cpu_routes.kn_gemm() == host
    notes = " ".join(InferenceBuilder().compatible("cpu").notes)
    assert ("float [K, N] weights past the GEMV: our GEMM" in notes) == host
    for ours in (False, True):
        with routes.kn_gemm(ours) as b, routes.fp32_gemm(not host):
            assert b.kn_gemm() == ours
            with routes.kn_gemm(not ours):
                assert b.kn_gemm() == (not ours)
            assert b.kn_gemm() == ours
    assert cpu_routes.kn_gemm() == host


# (layout, K, N, crossover on the native bf16 GEMM with the vdpbf16ps GEMV, the same without it, the same on AMX,
#  otherwise)
BF16_CROSSOVERS = [
    ("nk", 4096, 4096, 8, 4, 4, 16), ("nk", 256, 768, 8, 4, 4, 16),
    ("nk", 256, 4096, 4, 4, 2, 16),                              # [N,K] vdpbf16ps: 8, but 4 for K <= 256, N >= 4096
    ("kn", 4096, 4096, 8, 8, 8, 24), ("kn", 256, 768, 4, 4, 4, 24),  # [K,N]: 8 from K*N = 2^20, else 4; AMX too
    ("int8", 4096, 4096, 16, 8, 8, 24), ("int8", 256, 768, 8, 8, 8, 24),
    ("int8", 1024, 4096, 8, 8, 8, 24),  # int8 vdpbf16ps: 16 from K*N = 2^24, else 8; without: 8
    ("int8", 256, 4096, 8, 8, 4, 24),   # AMX: [N,K] 4 and int8 8, halved for K <= 256, N >= 4096
]


@pytest.mark.parametrize("amx", [False, True], ids=["vdpbf16ps", "amx"])
@pytest.mark.parametrize("on_native", [False, True])
@pytest.mark.parametrize("layout, K, N, native_dp, native_fp32, native_amx, other", BF16_CROSSOVERS)
def test_cpu_bf16_compiled_crossover_follows_the_large_m_gemm(cpu_routes, amx, on_native, layout, K, N, native_dp,
                                                             native_fp32, native_amx, other):
    """bf16 activations cross to ATen at M = 4-16 where the module runs the native bf16 GEMM past the GEMV
    (2.3-3x the fp32 path it replaces; docs/PERFORMANCE.md, "CPU bf16 prefill"), higher where this build's
    GEMV has the vdpbf16ps tile ("CPU decode at batch 8"), lower where that GEMM runs on AMX tiles ("CPU: an
    Intel host with AMX"; int8 to 16 where it runs on the tiles itself), at 16-24 on the fp32 path; fp16 keeps
    16-24 either way. The op takes the crossover: our GEMV at it, ATen one above. The fp32 GEMM is MKL's here
    (on oneDNN int8 crosses at 16: test_cpu_int8_crosses_sooner_on_onednn_but_its_gated_kernel_keeps_24)."""
    with routes.bf16_gemm(on_native), routes.fp32_gemm(False), routes.amx_bf16(amx):
        native = native_amx if amx else native_dp if cpu_routes.gemv_dpbf16() else native_fp32
        if amx and layout == "int8" and cpu_routes.amx_gemv():  # int8 on the AMX tiles themselves: to their 16
            native = 16
        want = native if on_native else other
        assert cpu_routes.default(RouteKey("bf16", layout, K, N)) == want
        assert cpu_routes.default(RouteKey("fp16", layout, K, N)) == other
        if K * N <= 1 << 20:  # the small shapes run the op
            run_at_the_crossover(cpu_routes, layout, K, N, want)


INT8_GATED_MAX_M = 24  # int8's gated kernel (fp32 FMAs) on either fp32 GEMM


@pytest.mark.parametrize("act", ["fp32", "fp16"])
@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
def test_cpu_int8_crosses_sooner_on_onednn_but_its_gated_kernel_keeps_24(cpu_routes, onednn, act):
    """int8 weights with fp32 arithmetic run our GEMV up to M = 24 where the GEMM past it is MKL's and up to 16
    where it is oneDNN's, which runs their widened blocks faster than our GEMV from M = 32 (docs/PERFORMANCE.md,
    "CPU: weights converted in the tile"); rms_mlp_gemm's gate|up keeps the gated kernel to 24 on either (the
    matmul path took 1.24-1.50x its time at M = 16-24). The op takes the crossover: our GEMV at it, ATen one
    above, and the gated kernel at 24. Forced onto oneDNN, a torch without it keeps the MKL rule."""
    K, N, I = 300, 40, 24
    with routes.fp32_gemm(onednn):
        want = 16 if onednn and torch.backends.mkldnn.is_available() else 24
        assert cpu_routes.default(RouteKey(act, "int8", K, N)) == want
        assert cpu_routes.default(RouteKey(act, "gated-int8", K, 2 * I)) == INT8_GATED_MAX_M
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[act]
        gen = torch.Generator().manual_seed(8)
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        w[w == 0] = 1
        scale = torch.rand(2, generator=gen) * 0.01 + 0.001
        op = getattr(torch.ops.dsinf, f"vector_matmul_{act}").default
        for m, path in ((want, "gemv"), (want + 1, "aten")):
            x = torch.randn(1, m, K, generator=gen).to(dtype)
            got = op(x, w, False, scale, True, True)
            assert cpu_routes.last() == path, m
            torch.testing.assert_close(got, dsinf.reference.vector_matmul(x, w, False, scale, True, True),
                                       rtol=2e-3, atol=2e-3)
        x, r, w1, w2, g, *rest = _mlp_case("int8", INT8_GATED_MAX_M, K=K, I=I)
        args = (x.to(dtype), r.to(dtype), w1, w2, g.to(dtype), *rest)
        getattr(torch.ops.dsinf, f"rms_mlp_gemm_{act}").default(*args)
        assert cpu_routes.last_gated() == "gated"


@pytest.mark.parametrize("layout", ["nk", "int8", "kn"])
def test_cpu_bf16_gate_up_leaves_the_gated_kernel_on_a_vdpbf16ps_build(cpu_routes, layout):
    """rms_mlp_gemm's gate|up: the gated kernel (fp32 FMAs) up to the plain GEMV's crossover, except bf16 [N, K]
    and int8 on a build whose GEMV has the vdpbf16ps tile with the native bf16 GEMM, where our GEMV + the gated
    epilogue ran faster at every decode M (Zen 4): there the gated key's crossover is 0, and an M = 1 call says so
    - unless the AMX rule holds (an Intel Xeon with AMX), where bf16 int8 ran faster on the gated kernel to M = 4."""
    from op_builder.builder import loaded_variants

    isa = loaded_variants()[(routes._OP, "cpu")].manifest["isa"]
    assert cpu_routes.gemv_dpbf16() == (isa == "avx512_bf16"), isa  # the build the report names
    x, r, w1, w2, g, *rest = _mlp_case(layout, 1)
    int8 = layout == "int8"
    for native, amx in ((False, False), (True, False), (True, True)):
        with routes.bf16_gemm(native), routes.amx_bf16(amx):
            off = native and cpu_routes.gemv_dpbf16() and layout != "kn"
            for dtype in (torch.bfloat16, torch.float32):
                args = (x.to(dtype), r.to(dtype), w1 if int8 else w1.to(dtype), w2 if int8 else w2.to(dtype),
                        g.to(dtype), *rest)
                key = routes.mlp_key_of(args[0], args[2], args[8], args[10])
                want_off = off and dtype == torch.bfloat16
                on_fp32_path = int8 and not (native and dtype == torch.bfloat16)  # int8's gated kernel keeps 24
                want = 0 if want_off else INT8_GATED_MAX_M if on_fp32_path else cpu_routes.default(key.plain)
                if want_off and int8 and amx:
                    want, want_off = 4, False
                assert cpu_routes.default(key) == want, (native, amx, dtype)
                getattr(torch.ops.dsinf, f"rms_mlp_gemm_{key.dtype}").default(*args)
                assert cpu_routes.last_gated() == ("matmul" if want_off else "gated"), (native, amx, dtype)


def run_at_the_crossover(cpu_routes, layout, K, N, want):
    gen = torch.Generator().manual_seed(6)
    if layout == "int8":
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        w[w == 0] = 1
        extra = (torch.rand(1, generator=gen) * 0.01 + 0.001, True, True)
    else:
        w = torch.randn(*((N, K) if layout == "nk" else (K, N)), generator=gen).to(torch.bfloat16)
        extra = (None, False, layout == "nk")
    op = torch.ops.dsinf.vector_matmul_bf16.default
    for m, path in ((want, "gemv"), (want + 1, "aten")):
        x = torch.randn(1, m, K, generator=gen).to(torch.bfloat16)
        got = op(x, w, False, *extra)
        assert cpu_routes.last() == path, (layout, m)
        want_out = dsinf.reference.vector_matmul(x, w, False, *extra)
        # bf16 output: a rounding step of the largest output (2^-8 of it) is the absolute tolerance
        torch.testing.assert_close(got, want_out, rtol=2e-2, atol=max(2e-2, want_out.abs().max().item() / 256))


def test_forced_routes_a_call_and_restores_the_table(cpu_routes):
    """routes.forced (what the kernel tests and probes use to reach our GEMV at every M): the keys it names
    take our GEMV up to the cap, or ATen with max_m=0, inside the block only; the table before comes back."""
    K, N = 256, 48
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(N, K, generator=gen), torch.randn(1, 16, K, generator=gen)
    op = torch.ops.dsinf.vector_matmul_fp32.default
    key = routes.key_of(x, w, False, True)
    assert key == RouteKey("fp32", "nk", K, N)
    assert routes.key_of(x, torch.zeros(N, K, dtype=torch.int8), True, False) == RouteKey("fp32", "int8", K, N)
    assert routes.key_of(x, torch.zeros(K, N), False, False) == RouteKey("fp32", "kn", K, N)
    table = {RouteKey("fp32", "kn", 8, 8): 2, key: 0}  # this shape on ATen, as a measured table may say
    cpu_routes.set(table)
    op(x, w, transposed_mode=True)
    assert cpu_routes.last() == "aten"
    with routes.forced("cpu", [key]) as b:
        assert b is cpu_routes and b.applied == {**table, key: b.gemv_cap}
        got = op(x, w, transposed_mode=True)
        assert b.last() == "gemv"
    torch.testing.assert_close(got, dsinf.reference.vector_matmul(x, w, transposed_mode=True), rtol=1e-4, atol=1e-4)
    assert cpu_routes.applied == table
    op(x, w, transposed_mode=True)
    assert cpu_routes.last() == "aten"
    cpu_routes.set({})  # the compiled crossover: M = 1 on our GEMV ...
    op(x[:, :1], w, transposed_mode=True)
    assert cpu_routes.last() == "gemv"
    with pytest.raises(RuntimeError, match="inside"):
        with routes.forced("cpu", [key], max_m=0):  # ... forced to ATen
            op(x[:, :1], w, transposed_mode=True)
            assert cpu_routes.last() == "aten"
            raise RuntimeError("inside")
    assert cpu_routes.applied == {}  # restored on the way out of an exception too


def test_route_keys_include_dtype_and_layout(cpu_routes):
    K, N = 64, 96
    w_nk = torch.randn(N, K, dtype=torch.bfloat16)
    x = torch.randn(1, 2, K, dtype=torch.bfloat16)
    op = torch.ops.dsinf.vector_matmul_bf16.default
    cpu_routes.set({RouteKey("bf16", "kn", K, N): 0, RouteKey("fp32", "nk", K, N): 0})
    op(x, w_nk, False, None, False, True)
    assert cpu_routes.last() == "gemv"  # neither entry is this (bf16, nk) shape
    cpu_routes.set({RouteKey("bf16", "nk", K, N): 0})
    [y] = torch.ops.dsinf.linear_layer_bf16.default(x, w_nk, None, False, False, 1, True)  # linear_layer too
    assert cpu_routes.last() == "aten"
    torch.testing.assert_close(y, dsinf.reference.linear_layer(x, w_nk, None, False, False, 1, True)[0])


def test_binding_rejects_a_bad_table(cpu_routes):
    key = RouteKey("fp32", "kn", 8, 8)
    for bad in (-1, (0, 4), (5, 4), (2, 0), (-3, 4)):  # max_m < 0; spans not 1 <= min_m <= max(max_m, 1)
        with pytest.raises(ValueError, match="rejected the table"):
            cpu_routes.set({key: bad})
        assert cpu_routes.applied == {}
    # ctypes would wrap 2**64 to 0 (ATen for every M) rather than refuse it
    with pytest.raises(ValueError, match=r"max_m of fp32\|kn\|K=8\|N=8 does not fit int64"):
        cpu_routes.set({key: 2**64})
    with pytest.raises(ValueError, match=r"min_m of fp32\|kn\|K=8\|N=8 does not fit int64"):
        cpu_routes.set({key: (2**64 + 1, 4)})
    with pytest.raises(ValueError, match=r"min_m of fp32\|kn\|K=8\|N=8 is not an int"):
        cpu_routes.set({key: (True, 4)})
    assert cpu_routes.applied == {}
    cpu_routes.set({key: (1, 0)})  # an empty span from 1 is ATen for every M, as max_m 0 is
    assert cpu_routes.span(key) == (1, 0)


def test_persisted_entries_outside_int64_are_dropped_and_the_rest_apply(cpu_routes, caplog):
    """The binding takes K, N and max_m as int64. An entry whose K wraps to a real shape's (2**64 + 64 -> 64)
    must not route that shape, and one that wraps to 0 (a size the binding refuses) must not void the valid
    routes beside it: both are malformed entries, dropped with the usual warning."""
    good = RouteKey("fp32", "kn", 64, 96)
    entry = {"min_m": 1, "max_m": 0, "default_max_m": 8, "buckets": [], "ours_ms": [], "aten_ms": [],
             "tuned_at": "t"}
    entries = {good.text: entry,
               f"fp32|kn|K={2**64 + 64}|N=32": entry,  # would route fp32 kn 64x32 to ATen
               f"fp32|kn|K={2**64}|N=96": entry,  # would be K=0: the binding refuses the whole table
               "fp32|nk|K=8|N=8": {**entry, "default_max_m": 2**63}}
    path = routes.table_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": routes.FORMAT, "version": routes.VERSION,
                                "tables": {routes.device_key("cpu"): entries}}))
    with caplog.at_level(logging.WARNING, logger="dsinf"):
        assert routes.apply("cpu") == 1
    assert cpu_routes.applied == {good: 0}
    assert any("3 malformed entries dropped" in r.getMessage() for r in caplog.records)
    op = torch.ops.dsinf.vector_matmul_fp32.default
    x = torch.randn(1, 1, 64)
    op(x, torch.randn(64, 96))
    assert cpu_routes.last() == "aten"  # the valid route applies
    op(x, torch.randn(64, 32))
    assert cpu_routes.last() == "gemv"  # the compiled crossover: no route names this shape
    assert "K=18446744073709551680" not in dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32),
                                                                device="cpu").decision.explain()


def test_alternating_sets_republish_their_tables_instead_of_leaking(cpu_routes):
    """A table is never freed (a reader may hold it), so a set equal to an earlier table must reuse it:
    the bench forces a route around each timed call, thousands of sets. 100,000 alternating sets of two
    64-entry tables would leak ~300 MB if each allocated; the resident size may not grow by 20 MB."""
    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base = {RouteKey("fp32", "kn", 8, n): 0 for n in range(1, 64)}
    forced = {**base, RouteKey("fp32", "kn", 8, 64): 1}
    base[RouteKey("fp32", "kn", 8, 64)] = 0
    for table in (base, forced):  # publish both once
        cpu_routes.set(table)
    before = rss_bytes()
    for _ in range(50_000):
        cpu_routes.set(forced)
        cpu_routes.set(base)
    assert rss_bytes() - before < 20 << 20
    assert cpu_routes.applied == base


# --- measuring ------------------------------------------------------------------------------------

def test_tune_routes_measures_persists_applies_and_reuses(cpu_routes, tmp_path, monkeypatch):
    [route] = routes.tune_routes([(256, 96), (256, 96)], torch.float32, "cpu", layout="kn")
    key = RouteKey("fp32", "kn", 256, 96)
    assert route.key == key and route.buckets[0] == 1 and route.default_max_m == cpu_routes.default(key)
    assert all(math.isfinite(t) and 0 < t < 1e3 for t in route.ours_ms + route.aten_ms)
    assert (route.min_m, route.max_m) == routes.decide_span(route.buckets, route.ours_ms, route.aten_ms)
    assert cpu_routes.applied[key] == route.entry
    assert cpu_routes.span(key) == (route.min_m, route.max_m)
    persisted = routes.read_tables(tmp_path / routes.FILENAME)
    assert [r for t in persisted.values() for r in t.values()] == [route]
    assert route.explain() in dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32)).resolve("cpu").explain()

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(routes, "measure", no_measuring)
    assert routes.tune_routes([(256, 96)], torch.float32, "cpu", layout="kn") == [route]  # persisted: reused
    cpu_routes.set({})
    assert routes.apply("cpu") == 1 and cpu_routes.applied == {key: route.entry}  # pushed at load


def _scripted_cpu_timing(monkeypatch, slow):
    """routes._measure_cpu replaced by a script: each call records the buckets it was asked to time and adds one
    sample per bucket and route; (bucket, call number) pairs in `slow` read our route at 3 ms, else 1 ms, and
    ATen always 2 ms. The decision and its second timings are measure()'s own."""
    calls = []

    def timing(b, key, base, op, xs, weights, ours, aten, reps, weight_bytes):
        calls.append(tuple(xs))
        for m in xs:
            ours[m].append(3.0 if (m, len(calls)) in slow else 1.0)
            aten[m].append(2.0)

    monkeypatch.setattr(routes, "_measure_cpu", timing)
    return calls


@pytest.mark.parametrize("slow, retimed, want", [
    ({(4, 1)}, [(4,)], (1, None)),        # one slow timing at M=4: timed again, it wins, the route goes on past it
    ({(4, 1), (4, 2)}, [(4,)], (1, 2)),   # slow again: a real loss, it stops at M=2
    ({(4, 1), (8, 1), (8, 3)}, [(4,), (8,)], (1, 4)),  # the stop moves to M=8, which is timed again too, and stays slow
    (set(), [], (1, None)),               # no stop below the top bucket: nothing timed twice
    ({(1, 1)}, [(1,)], (1, None)),        # one slow timing at M=1 started the span at 2: timed again, it wins
    ({(1, 1), (1, 2)}, [(1,)], (2, None)),  # slow again: ATen at M=1, ours from 2
    ({(1, 1), (4, 1), (1, 2), (4, 2)}, [(1, 4)], (2, 2)),  # both bounds timed again together, both slow again
])
def test_cpu_measuring_times_the_buckets_that_bound_the_decision_again(cpu_routes, monkeypatch, slow, retimed, want):
    key = RouteKey("fp32", "nk", 256, 96)
    ms = routes.buckets(cpu_routes.cap(key), cpu_routes.default(key))
    assert {1, 2, 4, 8, 16} <= set(ms)
    calls = _scripted_cpu_timing(monkeypatch, slow)
    route = routes.measure(key, "cpu")
    assert calls == [ms] + retimed
    assert (route.min_m, route.max_m) == (want[0], ms[-1] if want[1] is None else want[1])
    assert route.ours_ms[ms.index(4)] == (3.0 if (4, 2) in slow else 1.0)  # the fastest of its samples


@pytest.mark.parametrize("cache, memory, weight, want", [
    (480 << 20, 24 << 30, 4096 * 11008 * 4, 7),  # 2 x 480 MiB over 180 MB: 6, and one more
    (480 << 20, 24 << 30, 4096, 8),               # a small weight: at most 8
    (32 << 20, 24 << 30, 256 << 20, 2),           # a weight past twice the cache: itself and one more
    (None, 24 << 30, 16 << 20, 5),                # no cache listed: 32 MiB
    (480 << 20, 1 << 30, 180 << 20, 1),           # a quarter of 1 GiB holds one copy
    (480 << 20, None, 4096, 8),                   # memory unknown: the cap alone
])
def test_cpu_measuring_rotates_copies_past_the_cache(monkeypatch, cache, memory, weight, want):
    """A CPU measure rotates copies of the weight that together exceed twice the largest cache (a decode step
    reads each layer's weight from memory; one copy timed again and again ran from the cache), at most 8 and
    within a quarter of the memory available."""
    import op_builder.system

    fake = op_builder.system.System.fake(cpu_cache=cache, memory_available=memory)
    monkeypatch.setattr(op_builder.system, "current_system", lambda: fake)
    assert routes._cpu_copies(weight) == want


def test_cpu_measuring_times_every_copy(cpu_routes, monkeypatch):
    """measure() on CPU makes _cpu_copies copies; each sample's timed calls go through all of them, and the
    first timed call reads another copy than the warm-up call just before it did."""
    key = RouteKey("fp32", "kn", 256, 96)
    monkeypatch.setattr(routes, "_cpu_copies", lambda weight_bytes: 3)
    weights: list[int] = []  # the weight of every op call, in order
    samples: list[tuple[int, int]] = []  # each sample's timed calls: weights[start:end]
    real_time, real_op = routes._time_cpu, routes._op

    def timed(run, calls):
        start = len(weights)
        try:
            return real_time(run, calls)
        finally:
            samples.append((start, len(weights)))

    def recording_op(key, device, act, gen):
        op = real_op(key, device, act, gen)

        def run(x, w, scale):
            weights.append(id(w))
            return op(x, w, scale)
        return run

    monkeypatch.setattr(routes, "_time_cpu", timed)
    monkeypatch.setattr(routes, "_op", recording_op)
    routes.measure(key, "cpu", reps=1)
    assert samples
    for start, end in samples:
        assert len(set(weights[start:end])) == 3 and weights[start] != weights[start - 1]


def test_cpu_measuring_times_a_gated_keys_stop_again(cpu_routes, monkeypatch):
    """The gated rule stops at the first M where the matmul path wins; that M is timed again (here the gated
    kernel is "ours": 3 ms against the matmul's 2 ms is a loss, 1 ms a win)."""
    key = RouteKey("fp32", "gated-nk", 64, 96)
    ms = routes.buckets(cpu_routes.cap(key), cpu_routes.default(key))
    assert len(ms) >= 2
    calls = _scripted_cpu_timing(monkeypatch, {(ms[1], 1)})
    assert routes.measure(key, "cpu").max_m == ms[-1] and calls == [ms, (ms[1],)]
    calls = _scripted_cpu_timing(monkeypatch, {(ms[1], 1), (ms[1], 2)})
    assert routes.measure(key, "cpu").max_m == ms[0] and calls == [ms, (ms[1],)]


def test_cpu_measuring_an_int8_bf16_key_holds_the_amx_tiles_off(cpu_routes):
    """Where the CPU module runs int8 with bf16 activations on its AMX tiles ahead of the route, both timed sides
    would be the tiles: the route is measured between the GEMV and dequantize + GEMM with the tiles held off, and
    the host's choice comes back after. (A build or host without the tiles never runs them: the same holds.)"""
    tiles = cpu_routes.amx_gemv()
    key = RouteKey("bf16", "int8", 128, 96)
    before = cpu_routes.amx_gemv_calls()
    route = routes.measure(key, "cpu", reps=1)
    assert cpu_routes.amx_gemv_calls() == before and len(route.ours_ms) >= 3  # timed, never on the tiles
    assert cpu_routes.amx_gemv() == tiles
    x = torch.randn(1, 8, 128).to(torch.bfloat16)
    w = torch.randint(-127, 128, (96, 128), dtype=torch.int8)
    torch.ops.dsinf.vector_matmul_bf16.default(x, w, False, torch.rand(96) * 0.01 + 0.001, True, True)
    assert cpu_routes.amx_gemv_calls() == before + int(tiles)


def test_apply_ignores_other_devices_and_off(cpu_routes, tmp_path, monkeypatch):
    mine, theirs = RouteKey("fp16", "nk", 32, 32), RouteKey("fp16", "nk", 64, 64)
    routes._save(routes.device_key("cpu"), [_route(mine, 2)])
    routes._save("cpu|another CPU|threads=2|torch=x|build=y", [_route(theirs, 1)])
    monkeypatch.setenv("DSINF_ROUTES", "off")
    assert routes.apply("cpu") == 0 and cpu_routes.applied == {}
    monkeypatch.setenv("DSINF_ROUTES", "load")
    assert routes.apply("cpu") == 1 and cpu_routes.applied == {mine: 2}


def test_tune_routes_rejects_bad_arguments(cpu_routes):
    with pytest.raises(ValueError, match="'shapes'"):
        routes.tune_routes([(256,)], torch.float32, "cpu")
    with pytest.raises(ValueError, match="'dtype'"):
        routes.tune_routes([(8, 8)], torch.float64, "cpu")
    with pytest.raises(ValueError, match="'layout'"):
        routes.tune_routes([(8, 8)], torch.float32, "cpu", layout="tn")
    with pytest.raises(ValueError, match="'act_dtype'"):  # not 'dtype', which was int8 and right
        routes.tune_routes([(8, 8)], torch.int8, "cpu", act_dtype=torch.float64)
    for shapes in (None, "8x8", 8):
        with pytest.raises(ValueError, match="'shapes'"):
            routes.tune_mlp_routes(shapes, torch.float32, "cpu")
    for device in ("gpu0", "meta", torch.device("meta")):
        with pytest.raises(ValueError, match="'device'"):
            routes.tune_routes([(8, 8)], torch.float32, device)
    with pytest.raises(SystemExit):
        routes.main(["--tune", "64-32", "--device", "cpu"])  # argparse's error and usage, not a traceback


def test_no_measuring_under_torch_compile(cpu_routes, monkeypatch):
    measured = []
    real = routes.measure
    monkeypatch.setattr(routes, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    compiled = torch.compile(lambda x: (routes.tune_routes([(16, 16)], torch.float32, "cpu"), x + 1)[1],
                             backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="torch.compile"):
        compiled(torch.ones(2))
    assert measured == [] and cpu_routes.applied == {}
    torch._dynamo.reset()


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64, bias=False), nn.Linear(64, 96))


def test_inject_measures_only_on_cuda_unless_asked(cpu_routes, monkeypatch):
    monkeypatch.setenv("DSINF_ROUTES", "auto")
    dsinf.inject(_tiny_model())
    assert cpu_routes.applied == {}  # CPU: not measured by default
    monkeypatch.setenv("DSINF_ROUTES", "measure")
    model = dsinf.inject(_tiny_model())
    assert set(cpu_routes.applied) == {RouteKey("fp32", "nk", 64, 96), RouteKey("fp32", "nk", 96, 64)}
    x = torch.randn(3, 64)
    # In grad mode, on whichever route the measurement picked (the ATen route once failed on a weight that
    # still required grad): injected parameters do not require grad.
    assert not any(p.requires_grad for p in model.parameters())
    cpu_routes.set({k: 0 for k in cpu_routes.applied})  # force the ATen route for both shapes
    torch.testing.assert_close(model(x), _tiny_model()(x), rtol=1e-4, atol=1e-4)


def test_aten_only_reads_the_routes_in_force(cpu_routes):
    key = RouteKey("fp32", "nk", 64, 96)
    assert not routes.aten_only("cpu", torch.float32, 64, 96)  # no route: the compiled crossover decides
    cpu_routes.set({key: 0})
    assert routes.aten_only("cpu", torch.float32, 64, 96)
    assert not routes.aten_only("cpu", torch.float16, 64, 96) and not routes.aten_only("cpu", torch.float32, 96, 64)
    cpu_routes.set({key: 4})  # ours for M <= 4: the op must stay
    assert not routes.aten_only("cpu", torch.float32, 64, 96)


def test_injected_linear_keeps_the_op_on_cpu_even_when_routed_to_aten(cpu_routes):
    """The direct torch linear is for CUDA only: on CPU the binding's "ATen" path is its fp32 MKL GEMM,
    not torch's own bf16/fp16 linear, so an injected CPU module keeps calling the op."""
    cpu_routes.set({RouteKey("fp32", "nk", 64, 96): 0})
    model = dsinf.inject(_tiny_model())
    assert {m.route for m in model.modules() if isinstance(m, InjectedLinear)} == {"op"}


# --- rms_mlp_gemm's gate|up: the gated keys ---------------------------------------------------------

def test_gated_keys_name_the_gate_up_and_its_matmul():
    key = RouteKey("fp16", "gated-nk", 4096, 28672)
    assert key.gated and key.plain == RouteKey("fp16", "nk", 4096, 28672) and not key.plain.gated
    assert RouteKey.parse(key.text) == key and key.text == "fp16|gated-nk|K=4096|N=28672"
    with pytest.raises(ValueError, match="even"):
        RouteKey("fp16", "gated-kn", 64, 97)  # N is 2I
    gated, matmul = _route(key, 2).explain(), _route(key, 0).explain()
    assert "gate|up 4096x28672: gated kernel for M <= 2, matmul + gated epilogue above" in gated
    assert "matmul + gated epilogue for every M" in matmul and "matmul/gated" in matmul
    x, w = torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(96, 64, dtype=torch.int8)
    assert routes.mlp_key_of(x, w, True, False) == RouteKey("bf16", "gated-int8", 64, 96)
    assert routes.mlp_key_of(x, w.t().to(torch.bfloat16), False, False) == RouteKey("bf16", "gated-kn", 64, 96)


def _mlp_case(layout, M, K=64, I=48, seed=0):
    """rms_mlp_gemm_fp32's arguments, random (never zeros), weights in `layout` (kn | nk | int8)."""
    from dsinf.quantize import quantize_int8

    gen = torch.Generator().manual_seed(seed)
    x, r = torch.randn(1, M, K, generator=gen), torch.randn(1, M, K, generator=gen)
    g = torch.rand(K, generator=gen) + 0.5
    w1, w2 = torch.randn(2 * I, K, generator=gen) * K ** -0.5, torch.randn(K, I, generator=gen) * I ** -0.5
    if layout == "int8":
        q1, q2 = quantize_int8(w1, 4, transposed_mode=True), quantize_int8(w2, None, transposed_mode=True)
        return x, r, q1, q2, g, 1e-5, q1.scale, q2.scale, True, 4, True
    if layout == "kn":
        w1, w2 = w1.t().contiguous(), w2.t().contiguous()
    return x, r, w1, w2, g, 1e-5, None, None, False, 4, layout == "nk"


@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
def test_a_gated_route_moves_the_gate_up_between_the_gated_gemv_and_the_matmul(cpu_routes, layout):
    """The CPU binding reads the gated key on every rms_mlp_gemm call: the compiled crossover first, then the
    table either way; both paths give the reference's result, and the plain keys are not consulted for it."""
    op = torch.ops.dsinf.rms_mlp_gemm_fp32.default
    small, large = _mlp_case(layout, 4), _mlp_case(layout, 40, seed=1)
    key = routes.mlp_key_of(small[0], small[2], small[8], small[10])
    assert key == RouteKey("fp32", "gated-" + layout, 64, 96)
    assert 4 <= cpu_routes.default(key) < 40  # compiled: M = 4 on the gated GEMV, M = 40 on the matmul
    runs = {}
    for table in ({}, {key: 0}, {key: 64}, {key: (5, 64)},
                  {key.plain: 0, RouteKey("fp32", layout, 48, 64): 0}):  # + down
        cpu_routes.set(table)
        for name, case in (("small", small), ("large", large)):
            got = op(*case)
            runs[(len(runs), name)] = cpu_routes.last_gated()
            want = dsinf.reference.rms_mlp_gemm(*case)
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert list(runs.values()) == ["gated", "matmul",  # compiled crossover
                                   "matmul", "matmul",  # gated key 0: the matmul at every M
                                   "gated", "gated",  # gated key 64: the gated GEMV up to M = 64
                                   "matmul", "gated",  # gated key 5..64: M = 4 below the span
                                   "gated", "matmul"]  # plain keys only: the compiled gated crossover again


def test_the_binding_checks_gated_codes_and_caps(cpu_routes):
    import ctypes

    row = (ctypes.c_int64 * 5)(0, 7, 8, 8, 1)  # layout code 7: past the gated and int8-gemm codes
    assert cpu_routes._set(row, 1) == -1 and cpu_routes.applied == {}
    assert cpu_routes.cap(RouteKey("fp32", "gated-kn", 8, 8)) == cpu_routes.gated_cap >= 2 ** 62  # CPU: any M
    assert cpu_routes.cap(RouteKey("fp32", "kn", 8, 8)) == cpu_routes.gemv_cap
    with routes.forced("cpu", [RouteKey("fp32", "gated-nk", 64, 96)]) as b:
        assert b.applied == {RouteKey("fp32", "gated-nk", 64, 96): b.gated_cap}
    assert cpu_routes.applied == {}


def test_int8_gemm_keys_take_any_m_and_mean_nothing_to_the_cpu_module(cpu_routes):
    """An int8-gemm key (CUDA: the largest M on the int8 GEMM) has no cap in either binding; the CPU module has
    no int8 GEMM, so its compiled default is 0 and a key set there changes no path."""
    key = RouteKey("fp16", routes.INT8_GEMM, 64, 96)
    assert key.plain == key and not key.gated
    assert cpu_routes.default(key) == 0
    assert cpu_routes.limit(key) == cpu_routes.cap(key) == routes.INT8_GEMM_LIMIT
    x = torch.randn(1, 40, 64)
    w = quantize_int8(torch.randn(96, 64), None, transposed_mode=True)
    op = torch.ops.dsinf.vector_matmul_fp32
    want = op(x, w, False, w.scale, True, True)
    assert cpu_routes.last() == "aten"
    with routes.forced("cpu", [key]) as b:
        assert b.applied == {key: routes.INT8_GEMM_LIMIT}
        assert torch.equal(op(x, w, False, w.scale, True, True), want) and b.last() == "aten"
    assert cpu_routes.applied == {}
    text = routes.Route(key, 64, 128).explain()
    assert text == "fp16 int8 64x96 above the GEMV: int8 GEMM for M <= 64, dequantize + cuBLAS above (compiled crossover 128)"
    assert "dequantize + cuBLAS for every M" in routes.Route(key, 0, 128).explain()


def test_int8_gemm_keys_are_measured_on_cuda_only(cpu_routes, tmp_path):
    """tune_routes of int8 weights on the CPU measures the GEMV's key alone (no int8 GEMM there); measuring an
    int8-gemm key on the CPU is refused by name."""
    found = routes.tune_routes([(64, 96)], torch.int8, "cpu", act_dtype=torch.bfloat16)
    assert [r.key for r in found] == [RouteKey("bf16", "int8", 64, 96)]
    assert set(routes.read_tables(tmp_path / routes.FILENAME)[routes.device_key("cpu")]) == {found[0].key.text}
    found = routes.tune_mlp_routes([(64, 48)], torch.int8, "cpu", act_dtype=torch.bfloat16)
    assert [r.key for r in found] == [RouteKey("bf16", "int8", 64, 96), RouteKey("bf16", "int8", 48, 64),
                                      RouteKey("bf16", "gated-int8", 64, 96)]
    with pytest.raises(ValueError, match="int8-gemm keys are measured on CUDA"):
        routes.measure(RouteKey("bf16", routes.INT8_GEMM, 64, 96), "cpu")
    # an older dsinf would drop (and rewrite away) int8-gemm keys (v3) and min_m (v4)
    assert routes.FILENAME == "routes.v4.json"


def test_the_cli_tunes_int8_weights_with_their_activation_dtype(cpu_routes, tmp_path, capsys):
    """`python -m dsinf.routes --tune KxN --dtype int8 --act-dtype bf16` measures the bf16 int8 key, persists it
    and prints the table."""
    assert routes.main(["--tune", "64x96", "--device", "cpu", "--dtype", "int8", "--act-dtype", "bf16"]) == 0
    key = RouteKey("bf16", "int8", 64, 96)
    [route] = routes.read_tables(tmp_path / routes.FILENAME)[routes.device_key("cpu")].values()
    assert route.key == key and cpu_routes.applied == {key: route.max_m}
    assert route.explain() in capsys.readouterr().out


def test_tune_mlp_routes_tunes_the_matmuls_then_the_gated_kernel(cpu_routes, tmp_path, monkeypatch):
    """A gated MLP's gate|up matmul (K -> 2I), its down projection (I -> K), then its gated key, timed with both
    matmuls on the routes just measured."""
    measured, in_force = [], []
    real = routes.measure

    def measure(key, *a, **k):
        measured.append(key)
        in_force.append(dict(cpu_routes.applied))
        return real(key, *a, **k)

    monkeypatch.setattr(routes, "measure", measure)
    plain, down, gated = routes.tune_mlp_routes([(64, 48), (64, 48)], torch.float32, "cpu", layout="kn")
    assert measured == [RouteKey("fp32", "kn", 64, 96), RouteKey("fp32", "kn", 48, 64),
                        RouteKey("fp32", "gated-kn", 64, 96)]
    # the gated kernel is timed against the routed matmul, and with the down projection on its route
    assert in_force == [{}, {plain.key: plain.max_m}, {plain.key: plain.max_m, down.key: down.max_m}]
    assert (plain.key, down.key, gated.key) == tuple(measured)
    assert gated.default_max_m == cpu_routes.default(gated.key) and gated.buckets[0] == 1
    assert all(math.isfinite(t) and 0 < t < 1e3 for t in gated.ours_ms + gated.aten_ms)
    assert gated.max_m == routes.decide_gated(gated.buckets, gated.ours_ms, gated.aten_ms)
    assert cpu_routes.applied == {plain.key: plain.max_m, down.key: down.max_m, gated.key: gated.max_m}
    persisted = routes.read_tables(tmp_path / routes.FILENAME)
    assert sorted(r.key.text for t in persisted.values() for r in t.values()) == sorted(k.text for k in measured)
    config = dsinf.InferenceConfig(dtype=torch.float32, norm_type=NormType.RMSNorm,
                                   mlp_act_func_type=ActivationFuncType.GATED_SILU)
    mlp_explain = dsinf.MLPGemmOp(config).resolve("cpu").explain()
    assert gated.explain() in mlp_explain and plain.explain() in mlp_explain  # its matmuls take plain routes
    linear_explain = dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32)).resolve("cpu").explain()
    assert plain.explain() in linear_explain and "gate|up" not in linear_explain
    cpu_routes.set({})
    assert routes.apply("cpu") == 3
    assert cpu_routes.applied == {plain.key: plain.max_m, down.key: down.max_m, gated.key: gated.max_m}
    assert routes.tune_mlp_routes([(64, 48)], torch.float32, "cpu", layout="kn") == [plain, down, gated]  # reused
    assert len(measured) == 3
    with pytest.raises(ValueError, match="'shapes'"):
        routes.tune_mlp_routes([(64,)], torch.float32, "cpu")


def test_a_failed_tuning_keeps_and_persists_what_it_measured(cpu_routes, tmp_path, monkeypatch):
    real = routes.measure

    def measure(key, *a, **k):
        if key.gated:
            raise torch.cuda.OutOfMemoryError("planted")
        return real(key, *a, **k)

    monkeypatch.setattr(routes, "measure", measure)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="planted"):
        routes.tune_mlp_routes([(64, 48)], torch.float32, "cpu", layout="nk")
    plain, down = RouteKey("fp32", "nk", 64, 96), RouteKey("fp32", "nk", 48, 64)
    assert set(cpu_routes.applied) == {plain, down}
    persisted = routes.read_tables(tmp_path / routes.FILENAME)
    assert sorted(r.key.text for t in persisted.values() for r in t.values()) == sorted([plain.text, down.text])


def test_an_unwritable_cache_measures_once_per_process(cpu_routes, tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path / "file"))  # a file: the table cannot be written
    measured = []
    real = routes.measure
    monkeypatch.setattr(routes, "measure", lambda key, *a, **k: measured.append(key) or real(key, *a, **k))
    with caplog.at_level(logging.WARNING, logger="dsinf"):
        [plain, down, gated] = routes.tune_mlp_routes([(64, 48)], torch.float32, "cpu", layout="kn")
    assert "could not write the route table" in caplog.text and len(measured) == 3
    assert routes.tune_routes([(64, 96)], torch.float32, "cpu", layout="kn") == [plain]  # this process: reused
    assert routes.tune_mlp_routes([(64, 48)], torch.float32, "cpu", layout="kn") == [plain, down, gated]
    assert len(measured) == 3
    routes.tune_routes([(64, 96)], torch.float32, "cpu", layout="kn", force=True)
    assert len(measured) == 4  # force measures again


def test_cuda_timing_warms_both_routes_until_its_time_has_passed(monkeypatch):
    """Before a bucket is timed its graphs replay in turn, each at least once, until the warm-up time has passed
    (synchronized: the time is the GPU's, not the launches'). torch.cuda.synchronize stands in for the GPU here;
    the GPU tests run the real measuring loop."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    replays = [lambda: calls.append("ours"), lambda: calls.append("aten")]
    routes._warm(replays, 0.0)
    assert calls == ["ours", "aten", "sync"]
    calls.clear()
    start = time.perf_counter()
    routes._warm(replays, 0.02)
    assert time.perf_counter() - start >= 0.02 and calls[-1] == "sync"
    assert calls[:3] == ["ours", "aten", "sync"] and calls.count("ours") == calls.count("aten") > 1
    assert routes.WARM_FIRST_S >= 0.02 and 0 < routes.WARM_S <= routes.WARM_FIRST_S


def test_a_gated_route_on_cuda_moves_only_the_size_threshold():
    """Binding.cap's rule, on a binding object standing in for the CUDA module (the GPU test below checks
    the real one): a gated key's tunable cap is its compiled max_m on small weights."""
    b = routes.Binding.__new__(routes.Binding)
    b.variant, b.gemv_cap, b.gated_cap = "cuda", 16, 8
    small = {"nk": 8, "int8": 8, "kn": 2}  # fp16: the compiled rule at a tiny size
    b.default = lambda key: small[key.plain.layout] if key.K * key.N < 1 << 20 else 0
    assert [b.cap(RouteKey("fp16", "gated-" + lay, 4096, 28672)) for lay in ("nk", "int8", "kn")] == [8, 8, 2]
    assert b.cap(RouteKey("fp16", "nk", 4096, 28672)) == 16
    b.variant = "cpu"
    assert b.cap(RouteKey("fp16", "gated-kn", 4096, 28672)) == 8


def test_inject_measures_the_fused_mlp_after_its_linears(cpu_routes, monkeypatch):
    import transformers

    monkeypatch.setenv("DSINF_ROUTES", "measure")
    measured = []
    real = routes.measure
    monkeypatch.setattr(routes, "measure", lambda key, *a, **k: measured.append(key) or real(key, *a, **k))
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = dsinf.inject(transformers.LlamaForCausalLM(config).eval())
    gated = RouteKey("fp32", "gated-nk", 64, 192)
    assert measured[-1] == gated and gated.plain in measured[:-1]  # once for both layers, after the linears
    assert gated in cpu_routes.applied
    n = len(measured)  # the summary says what this inject measured, and a second one reuses all of it
    assert f"{n} routes of its shapes: {n} measured now" in dsinf.injection_summary(model).format()
    torch.manual_seed(0)
    again = dsinf.inject(transformers.LlamaForCausalLM(config).eval())
    assert len(measured) == n and ": 0 measured now" in dsinf.injection_summary(again).routes
    assert f"{n} reused" in dsinf.injection_summary(again).routes
    cpu_routes.set({**cpu_routes.applied, gated: 0})  # the other path: same logits
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        cpu_routes.set({**cpu_routes.applied, gated: 64})
        b = model(ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- GPU (the lead runs these on the H200) ---------------------------------------------------------

def _graph_ratio(torch_run, ours_run, samples=15, replays=4):
    """torch time / ours time of CUDA graphs of the two, sampled alternately (clock and thermal drift fall on
    both; timed one after the other, cuBLAS against itself read 0.97x once), medians of `samples`."""
    graphs = [routes._graph(torch_run), routes._graph(ours_run)]
    assert all(g is not None for g in graphs), "CUDA-graph capture failed"
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    times = [[], []]
    for _ in range(samples):
        for g, t in zip(graphs, times):
            t.append(routes._time_cuda(lambda g=g: [g.replay() for _ in range(replays)], replays))
    return statistics.median(times[0]) / statistics.median(times[1])


@gpu
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gpu_inject_measures_on_cuda(cuda_module, tmp_path, monkeypatch, quantize):
    """inject on CUDA measures each linear's key (DSINF_ROUTES=auto); int8 weights: the GEMV's and the int8
    GEMM's."""
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DSINF_ROUTES", "auto")
    b = routes.binding("cuda")
    saved = dict(b.applied)
    layouts = ("int8", routes.INT8_GEMM) if quantize else ("nk",)
    try:
        dsinf.inject(_tiny_model().to("cuda", torch.float16), quantize=quantize)
        assert {RouteKey("fp16", lay, K, N) for lay in layouts for K, N in ((64, 96), (96, 64))} <= set(b.applied)
    finally:
        b.set(saved)


@gpu
@pytest.mark.parametrize("layout, K, N", [("kn", 4096, 12288), ("nk", 4096, 12288), ("kn", 4096, 4096)])
def test_gpu_routed_decode_is_never_slower_than_torch(cuda_module, tmp_path, monkeypatch, layout, K, N):
    """Tune the shape, then time the routed op against torch (the same weight layout's matmul) at each M,
    in CUDA graphs over rotating weights larger than L2: routed >= 0.98x torch everywhere."""
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    b = routes.binding("cuda")
    saved = dict(b.applied)
    try:
        [route] = routes.tune_routes([(K, N)], torch.float16, "cuda", layout=layout, force=True)
        assert (route.min_m, route.max_m) == routes.decide_span(route.buckets, route.ours_ms, route.aten_ms), \
            route.explain()
        for m, ratio in zip(route.buckets, route.ratios):
            # ATen measured faster beyond the margin: this M routes to ATen. (A tie, within the margin either
            # way, may ride along with a win above it, `decide`: the timing below judges it.)
            if ratio * (1 + routes.MARGIN) < 1:
                assert not b.runs_ours(route.key, m), route.explain()
        print(route.explain())
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        copies = max(1, math.ceil(2 * l2 / (K * N * 2)) + 1)
        ws = [torch.randn((K, N) if layout == "kn" else (N, K), device="cuda", dtype=torch.float16) * 0.05
              for _ in range(copies)]
        calls = copies * max(1, math.ceil(16 / copies))
        op = torch.ops.dsinf.vector_matmul_fp16.default
        for m in route.buckets:
            x = torch.randn(1, m, K, device="cuda", dtype=torch.float16)

            def ours(x=x):
                for i in range(calls):
                    op(x, ws[i % copies], False, None, False, layout == "nk")

            def torch_mm(x=x):
                for i in range(calls):
                    w = ws[i % copies]
                    torch.matmul(x, w) if layout == "kn" else torch.nn.functional.linear(x, w)

            ratio = _graph_ratio(torch_mm, ours)
            print(f"{layout} {K}x{N} M={m}: torch/ours {ratio:.3f}")
            assert ratio >= 0.98, f"M={m}: {ratio:.3f}x torch; {route.explain()}"
    finally:
        b.set(saved)


@gpu
def test_gpu_linear_routed_to_aten_for_every_m_calls_torch_linear(cuda_module, monkeypatch):
    """A float shape routed to ATen for every M is bound to torch's linear (no custom op on the hot path),
    the summary says so, and a shape that keeps our GEMV still calls the op."""
    monkeypatch.setenv("DSINF_ROUTES", "load")  # no measuring: the test sets the routes itself
    b = routes.binding("cuda")
    saved = dict(b.applied)
    try:
        b.set({**saved, RouteKey("fp16", "nk", 64, 96): 0, RouteKey("fp16", "nk", 96, 64): 8})
        model = dsinf.inject(_tiny_model().to("cuda", torch.float16))
        by_shape = {(m.in_features, m.out_features): m.route for m in model.modules()
                    if isinstance(m, InjectedLinear)}
        assert by_shape == {(64, 96): "aten", (96, 64): "op"}
        assert "call torch's linear" in dsinf.injection_summary(model).format()
        x = torch.randn(3, 64, device="cuda", dtype=torch.float16)
        ref = _tiny_model().to("cuda", torch.float16)
        torch.testing.assert_close(model(x), ref(x), rtol=2e-2, atol=2e-2)
    finally:
        b.set(saved)


@gpu
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
def test_gpu_int8_gemm_route_is_measured_taken_and_never_slower(cuda_module, tmp_path, monkeypatch, act):
    """tune_routes of int8 weights on CUDA measures the GEMV's key and then the int8 GEMM's at the prefill
    buckets; the route it applies is the path each M takes (the binding's last path), the decision explains
    it. Timed in CUDA graphs over rotating weights larger than L2 against dequantize + cuBLAS (the path a
    route of 0 forces): at the route's largest M the GEMM was measured faster by more than MARGIN
    (decide_key; the bound allows 2 x MARGIN below even for noise between two timings), above it the routed
    op is dequantize + cuBLAS itself."""
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    K, N = 4096, 4096  # 16 MiB: the GEMM wins at short prompts, cuBLAS at long ones (H200: from M ~ 256)
    suffix = {torch.float16: "fp16", torch.bfloat16: "bf16"}[act]
    b = routes.binding("cuda")
    saved = dict(b.applied)
    try:
        gemv, gemm = routes.tune_routes([(K, N)], torch.int8, "cuda", act_dtype=act, force=True)
        print(gemv.explain(), gemm.explain(), sep="\n")
        assert gemv.key == RouteKey(suffix, "int8", K, N) and gemm.key == RouteKey(suffix, routes.INT8_GEMM, K, N)
        assert gemm.buckets[0] == 16 and gemm.buckets[-1] == 2048 and set(routes.GEMM_BUCKETS) <= set(gemm.buckets)
        decided = routes.decide_key(gemm.key, gemm.buckets, gemm.ours_ms, gemm.aten_ms)
        assert (1, b.applied[gemm.key]) == (gemm.min_m, gemm.max_m) == decided
        assert 0 < gemm.max_m < 2048, gemm.explain()  # the GEMM wins short prompts and loses long ones here
        # ... past the GEMV's Ms (16 at most; run 120: the GEMM 1.3-1.6x dequantize + cuBLAS at M = 17..128),
        # so the M checked below runs on the GEMM, not on the GEMV
        assert gemm.max_m > gemv.max_m, (gemv.explain(), gemm.explain())
        assert gemm.explain() in dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.int8, act_dtype=act)).resolve(
            "cuda").explain()
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        copies = max(1, math.ceil(2 * l2 / (K * N)) + 1)
        ws = [quantize_int8(torch.randn(N, K, device="cuda"), None, transposed_mode=True) for _ in range(copies)]
        calls = copies * max(1, math.ceil(16 / copies))
        op = getattr(torch.ops.dsinf, f"vector_matmul_{suffix}").default
        above = [m for m in gemm.buckets if m > gemm.max_m][0]
        for m in (gemm.max_m, above):
            x = torch.randn(1, m, K, device="cuda", dtype=act)
            op(x, ws[0], False, ws[0].scale, True, True)
            assert b.last() == ("int8-gemm" if m <= gemm.max_m else "aten"), (m, gemm.explain())

            def run(x=x):
                for i in range(calls):
                    op(x, ws[i % copies], False, ws[i % copies].scale, True, True)

            def dequantized(run=run):  # the route is read on the host: a graph captured here replays this path
                with routes.forced("cuda", [gemm.key], 0):
                    run()

            ratio = _graph_ratio(dequantized, run)
            print(f"{suffix} int8 {K}x{N} M={m}: dequantize+cuBLAS / routed {ratio:.3f}")
            assert ratio >= 1 - 2 * routes.MARGIN, f"M={m}: {ratio:.3f}x; {gemm.explain()}"
    finally:
        b.set(saved)


def _cuda_mlp_case(layout, M, K=256, I=160, seed=0):
    """_mlp_case's arguments on the GPU with fp16 activations (and fp16 weights unless int8)."""
    case = list(_mlp_case(layout, M, K, I, seed))
    for i in (0, 1, 4) + ((2, 3) if layout != "int8" else ()):
        case[i] = case[i].to("cuda", torch.float16)
    if layout == "int8":
        for i in (2, 3, 6, 7):
            case[i] = case[i].to("cuda")
    return tuple(case)


GATED_KERNEL = {"nk": "gated_tc_kernel", "int8": "gated_tc_kernel", "kn": "gated_kn_kernel"}


@gpu
@pytest.mark.parametrize("layout", ["nk", "kn", "int8"])
def test_gpu_a_gated_route_picks_the_kernel_that_runs(cuda_module, layout):
    """On CUDA the gated key moves rms_mlp_gemm's gate|up between the gated kernel and the matmul +
    gated_act, beyond the compiled rule's reach too ([K, N] at M = 5): the profiler's kernel names say
    which ran, and both paths give the reference's result."""
    case = _cuda_mlp_case(layout, 5)
    op = torch.ops.dsinf.rms_mlp_gemm_fp16.default
    key = routes.mlp_key_of(case[0], case[2], case[8], case[10])
    b = routes.binding("cuda")
    compiled = "gated" if b.default(key) >= 5 else "matmul"
    assert compiled == ("matmul" if layout == "kn" else "gated")  # the [K, N] gated kernel: M <= 2
    assert b.cap(key) == (2 if layout == "kn" else 8) and b.gated_cap == 8  # a tuning's reach; forced's
    want = dsinf.reference.rms_mlp_gemm(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in case])
    for max_m, path in ((None, compiled), (b.gated_cap, "gated"), (0, "matmul")):
        ctx = routes.forced("cuda", [key], max_m) if max_m is not None else contextlib.nullcontext()
        with ctx:
            op(*case)  # warm
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                got = op(*case)
                torch.cuda.synchronize()
            assert b.last_gated() == path
        names = " ".join(e.name for e in prof.events())
        ran = {k for k in ("gated_tc_kernel", "gated_kn_kernel", "gated_act_kernel") if k in names}
        assert ran == {GATED_KERNEL[layout] if path == "gated" else "gated_act_kernel"}, names[:600]
        torch.testing.assert_close(got[1].cpu(), want[1].to(torch.float16), rtol=0, atol=0)
        err = ((got[0].cpu().float() - want[0].float()).abs().max() / want[0].float().abs().max()).item()
        assert err < 4e-3, f"{path}: relative error {err:.3g}"


@gpu
def test_gpu_tune_mlp_routes_of_int8_weights_tune_the_gate_ups_int8_gemm(cuda_module, tmp_path, monkeypatch):
    """An int8 MLP on CUDA: the gate|up's GEMV key, then its int8 GEMM's (the matmul at a prompt's M), the down
    projection's two, then the gated key."""
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    b = routes.binding("cuda")
    saved = dict(b.applied)
    try:
        found = routes.tune_mlp_routes([(256, 160)], torch.int8, "cuda", act_dtype=torch.float16, force=True)
        matmuls = [RouteKey("fp16", layout, K, N) for K, N in ((256, 320), (160, 256))
                   for layout in ("int8", routes.INT8_GEMM)]
        assert [r.key for r in found] == [*matmuls, RouteKey("fp16", "gated-int8", 256, 320)]
        assert all(b.applied[r.key] == r.max_m for r in found)
    finally:
        b.set(saved)


@gpu
def test_gpu_tune_mlp_routes_and_inject_on_cuda(cuda_module, tmp_path, monkeypatch):
    """tune_mlp_routes measures on CUDA and the route it applies is the path the op takes; inject measures a
    fused Llama MLP's gated key on CUDA by default."""
    import transformers

    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DSINF_ROUTES", "auto")
    b = routes.binding("cuda")
    saved = dict(b.applied)
    try:
        plain, down, gated = routes.tune_mlp_routes([(2048, 5632)], torch.float16, "cuda", force=True)
        assert (plain.key, down.key) == (RouteKey("fp16", "nk", 2048, 11264), RouteKey("fp16", "nk", 5632, 2048))
        print(plain.explain(), gated.explain(), sep="\n")
        assert gated.key == RouteKey("fp16", "gated-nk", 2048, 11264) and gated.buckets == (1, 2, 4, 8)
        assert b.applied[gated.key] == gated.max_m == routes.decide_gated(gated.buckets, gated.ours_ms,
                                                                          gated.aten_ms)
        case = _cuda_mlp_case("nk", 1, 2048, 5632)
        torch.ops.dsinf.rms_mlp_gemm_fp16.default(*case)
        assert b.last_gated() == ("gated" if gated.max_m >= 1 else "matmul")
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                          max_position_embeddings=64)
        torch.manual_seed(0)
        dsinf.inject(transformers.LlamaForCausalLM(config).eval().to("cuda", torch.float16))
        assert RouteKey("fp16", "gated-nk", 64, 192) in b.applied
    finally:
        b.set(saved)
