"""dsinf.routes: the measured GEMV/ATen routes - the decision, the persisted table, the binding honouring a
route, measurement, and when inject measures. CPU tests use the real compiled CPU module; GPU tests are
marked `gpu` (the H200 numbers behind them: docs/PERFORMANCE.md)."""
from __future__ import annotations

import json
import logging
import math
import os
import statistics

import pytest
import torch
from torch import nn

import dsinf
from dsinf import routes
from dsinf.inject import InjectedLinear
from dsinf.routes import Route, RouteKey
from op_builder import knobs

gpu = pytest.mark.gpu


@pytest.fixture
def cpu_routes(cpu_module, tmp_path, monkeypatch):
    """The CPU module's route table, emptied for the test and restored after; a private table file."""
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
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


def test_buckets_cover_the_compiled_crossover_and_stop_at_the_gemv_limit():
    assert routes.buckets(16, 8) == (1, 2, 4, 8, 16)
    assert routes.buckets(2**62, 24) == (1, 2, 4, 8, 16, 24, 32, 64)
    assert routes.buckets(4, 8) == (1, 2, 4)


@pytest.mark.parametrize("bad", [("fp8", "kn", 4, 4), ("fp16", "tn", 4, 4), ("fp16", "kn", 0, 4),
                                 ("fp16", "kn", 4, True)])
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
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="dsinf"):
        tables = routes.read_tables(path)
    assert list(tables["dev"]) == [good.text]
    assert any("2 malformed entries dropped" in r.getMessage() for r in caplog.records)


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
    cpu_routes.set({key: 0})  # ... the table sends it to ATen: torch's own sgemm, bit for bit
    out = op(x, w)
    assert cpu_routes.last() == "aten" and torch.equal(out[0], torch.mm(x[0], w))
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
    with pytest.raises(ValueError, match="rejected the table"):
        cpu_routes.set({key: -1})
    assert cpu_routes.applied == {}


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
    assert route.max_m == routes.decide(route.buckets, route.ours_ms, route.aten_ms)
    assert cpu_routes.applied[key] == route.max_m
    persisted = routes.read_tables(tmp_path / routes.FILENAME)
    assert [r for t in persisted.values() for r in t.values()] == [route]
    assert route.explain() in dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32)).resolve("cpu").explain()

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(routes, "measure", no_measuring)
    assert routes.tune_routes([(256, 96)], torch.float32, "cpu", layout="kn") == [route]  # persisted: reused
    cpu_routes.set({})
    assert routes.apply("cpu") == 1 and cpu_routes.applied == {key: route.max_m}  # pushed at load


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
def test_gpu_inject_measures_on_cuda(cuda_module, tmp_path, monkeypatch):
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DSINF_ROUTES", "auto")
    b = routes.binding("cuda")
    saved = dict(b.applied)
    try:
        dsinf.inject(_tiny_model().to("cuda", torch.float16))
        assert {RouteKey("fp16", "nk", 64, 96), RouteKey("fp16", "nk", 96, 64)} <= set(b.applied)
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
        assert route.max_m == routes.decide(route.buckets, route.ours_ms, route.aten_ms), route.explain()
        for m, ratio in zip(route.buckets, route.ratios):
            if ratio < 1:  # ATen measured faster: this M and every larger one must route to ATen
                assert m > route.max_m, route.explain()
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
