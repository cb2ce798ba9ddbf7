"""dsinf.triton kernels against dsinf.reference.

Two halves:
- CPU (CI): every case of CASES runs under the Triton interpreter in ONE worker subprocess (this file
  run as a script with TRITON_INTERPRET=1). Triton decides interpreter-or-compiler for every
  @triton.jit function - its own standard library too - when triton is imported, so interpreted and
  compiled kernels cannot live in one process: a subprocess keeps this test independent of what
  the rest of the suite imported, and lets the GPU tests below run in the pytest process.
  The interpreter is correct for fp32 and fp16 and wrong for bf16, so bf16 is tested on the GPU only.
- GPU (`@pytest.mark.gpu`, skipped without CUDA): fp16/bf16 x weight layouts x M in
  {1, 2, 3, 8, 16, 17, 64, 2048} x int8, the QKV/RoPE epilogue at large positions, the TMA kernels
  on sm_90+ (M=2048 and a ragged shape, default and forced configs, the kernel that ran checked), and
  a second process that reuses the autotune table with zero benchmarks.

Which matmul kernel ran is read from `ops.launch_counts()`: a case that forces a TMA config fails if
the launcher quietly fell back to the pointer kernel (and a fallback case fails if it did not).

Inputs are random and never zero (x ~ N(0,1), w ~ N(0,1/K), so outputs are O(1)), shapes are odd on
purpose (K and N not multiples of 8 or 16, S = 1, B > 1). Tolerances per dtype: fp32 1e-4 (fp32
accumulation in another order, fp32 RoPE angles vs the reference's fp64 ones); fp16 2e-3 (one or two
fp16 roundings of O(1) values, 2^-11 each); bf16 2e-2 (two bf16 roundings, 2^-8 each).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the worker runs this file as a script
    sys.path.insert(0, str(REPO))

from op_builder import knobs  # noqa: E402 - after the path set-up above

TOL = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cfg(bm, bn, bk, split=1, warps=4, stages=2, group=8, kernel=None, subtile=None, slices=None):
    """A config; KERNEL / EPILOGUE_SUBTILE / SLICES only when given (absent: the pointer kernel, no subtile,
    one K-slice)."""
    c = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SPLIT_K": split,
         "num_warps": warps, "num_stages": stages}
    c.update({k: v for k, v in (("KERNEL", kernel), ("EPILOGUE_SUBTILE", subtile), ("SLICES", slices))
              if v is not None})
    return c


def tma(bm, bn, bk, group=8, subtile=0):
    return cfg(bm, bn, bk, group=group, kernel=1, subtile=subtile)


def tma_persistent(bm, bn, bk, group=8, subtile=0):
    return cfg(bm, bn, bk, group=group, kernel=2, subtile=subtile)


def gemv(bm, bn, bk, split=1, warps=4, stages=2):
    """A config of the GEMV kernel (the weight tile as the dot's left operand)."""
    return cfg(bm, bn, bk, split, warps, stages, kernel=3)


def slices(bm, bn, bk, n_slices, split=1, warps=4, stages=2):
    """A config of the slices kernel: `n_slices` K-slices of BLOCK_K per program and iteration."""
    return cfg(bm, bn, bk, split, warps, stages, kernel=4, slices=n_slices)


def case(id, op="vector_matmul", dtype="fp32", B=1, S=1, K=40, N=24, layout="kn", groups=1, bias=False,
         heads=0, kv=-1, rd=-1, rotate_half=False, theta=10000.0, offset=0, config=None, kernel=None):
    """`kernel`: the kernel that must run (a KERNEL_NAMES value); by default the forced config's own."""
    return dict(id=id, op=op, dtype=dtype, B=B, S=S, K=K, N=N, layout=layout, groups=groups, bias=bias,
                heads=heads, kv=kv, rd=rd, rotate_half=rotate_half, theta=theta, offset=offset, config=config,
                kernel=kernel)


def flash(id, dtype="fp32", B=2, S=3, heads=4, kv=-1, D=16, **kw):
    kvh = heads if kv == -1 else kv
    return case(id, op="linear_layer", dtype=dtype, B=B, S=S, K=heads * D, N=(heads + 2 * kvh) * D, heads=heads,
                kv=kv, **kw)


# The interpreter cases. Forced configs reach each kernel path: split-K with and without EVEN_K,
# several M-tiles (GROUP_M swizzle), the split-K partials read by the QKV epilogue.
CASES = [
    case("vm-fp32-kn-decode", K=45, N=37),
    case("vm-fp16-nk-B2S3-oddK", dtype="fp16", B=2, S=3, K=45, N=37, layout="nk"),
    case("vm-fp32-kn-splitk3-ragged", B=1, S=5, K=100, N=33, config=cfg(16, 16, 16, split=3)),
    case("vm-fp16-nk-splitk2-evenk", dtype="fp16", B=2, S=1, K=64, N=40, layout="nk", config=cfg(16, 16, 16, split=2)),
    case("vm-fp32-nk-3mtiles-group2", B=3, S=17, K=33, N=50, layout="nk", config=cfg(16, 16, 32, group=2)),
    case("vm-fp16-int8-g4", dtype="fp16", B=1, S=2, K=40, N=48, layout="int8", groups=4),
    case("vm-fp32-int8-perchannel-splitk", B=2, S=1, K=70, N=21, layout="int8", groups=21, config=cfg(16, 16, 16, 2)),
    case("lin-fp32-kn-bias", op="linear_layer", B=2, S=5, K=24, N=19, bias=True),
    case("lin-fp16-nk-bias-2mtiles", op="linear_layer", dtype="fp16", B=2, S=17, K=30, N=27, layout="nk", bias=True),
    case("lin-fp32-kn-bias-splitk", op="linear_layer", B=1, S=1, K=96, N=35, bias=True, config=cfg(16, 16, 16, 4)),
    case("lin-fp16-int8-bias-g2", op="linear_layer", dtype="fp16", B=1, S=3, K=36, N=26, layout="int8", groups=2,
         bias=True),
    case("lin-fp32-nobias-given", op="linear_layer", B=1, S=2, K=20, N=18, bias="unused"),
    flash("qkv-fp32-mha-neox-full", rd=16, rotate_half=True, offset=7, bias=True),
    flash("qkv-fp32-mha-gptj-partial-nk", rd=8, layout="nk", offset=0),
    flash("qkv-fp16-gqa-neox-splitk", dtype="fp16", kv=2, rd=16, rotate_half=True, offset=100, bias=True,
          config=cfg(16, 32, 16, split=2)),
    flash("qkv-fp32-gqa-D10-gptj-decode", B=3, S=1, heads=6, kv=3, D=10, rd=6, offset=41, bias=True),
    flash("qkv-fp16-mha-norope-int8", dtype="fp16", layout="int8", groups=3, bias=True),
    flash("qkv-fp32-mqa-neox-splitk3", B=1, S=4, kv=1, rd=16, rotate_half=True, offset=3000, theta=500000.0,
          config=cfg(16, 16, 16, split=3)),
    flash("qkv-fp32-gqa-4heads-per-program", B=2, S=20, heads=3, kv=1, D=8, rd=8, rotate_half=True, offset=9,
          bias=True),
    flash("qkv-fp16-8heads-per-program-splitk", dtype="fp16", B=3, S=100, heads=4, kv=2, D=8, rd=4, offset=1,
          bias=True, config=cfg(32, 32, 16, split=2)),
    flash("qkv-fp32-neox-partial-D12", B=2, S=2, heads=2, D=12, rd=8, rotate_half=True, offset=5, layout="nk"),
    # The TMA kernels: M not a multiple of BLOCK_M, K and N multiples of 8 but not of the blocks (the copy
    # engine zero-fills the ragged tiles), both layouts, bias or not; the persistent kernel with more
    # tiles than programs (4 "SMs" under the interpreter), with and without the split epilogue.
    case("tma-fp16-nk-bias-oddM", op="linear_layer", dtype="fp16", B=1, S=37, K=88, N=56, layout="nk", bias=True,
         config=tma(16, 32, 32, group=2)),
    case("tma-fp16-kn-bias-B2", op="linear_layer", dtype="fp16", B=2, S=19, K=40, N=72, bias=True,
         config=tma(16, 32, 16, group=2)),
    case("tma-fp32-nk-nobias", B=3, S=7, K=72, N=40, layout="nk", config=tma(16, 16, 32)),
    case("tma-fp32-kn-subtile", B=1, S=33, K=24, N=104, config=tma(32, 64, 16, subtile=1)),
    case("tma-persistent-fp16-nk-bias", op="linear_layer", dtype="fp16", B=1, S=70, K=56, N=72, layout="nk",
         bias=True, config=tma_persistent(16, 32, 32, group=2)),
    case("tma-persistent-fp16-kn-subtile-bias", op="linear_layer", dtype="fp16", B=1, S=45, K=48, N=136, bias=True,
         config=tma_persistent(16, 64, 32, subtile=1)),
    case("tma-persistent-fp32-nk-subtile", B=2, S=25, K=32, N=88, layout="nk", config=tma_persistent(32, 32, 16, subtile=1)),
    flash("qkv-fp16-tma-nk", dtype="fp16", B=2, S=9, heads=4, kv=2, D=16, rd=16, rotate_half=True, offset=3,
          bias=True, layout="nk", config=tma(16, 32, 32)),
    # A TMA config whose problem cannot use TMA runs on the pointer kernel: K % 8 != 0, N % 8 != 0, int8.
    case("tma-cfg-oddK-falls-back", dtype="fp16", B=1, S=20, K=45, N=32, layout="nk", config=tma(16, 32, 32),
         kernel="pointer"),
    case("tma-cfg-oddN-falls-back", op="linear_layer", dtype="fp16", B=1, S=20, K=48, N=30, bias=True,
         config=tma_persistent(16, 32, 32), kernel="pointer"),
    case("tma-cfg-int8-falls-back", dtype="fp16", B=1, S=20, K=48, N=32, layout="int8", groups=2,
         config=tma(16, 32, 32), kernel="pointer"),
    flash("qkv-fp16-tma-cfg-oddK-falls-back", dtype="fp16", B=1, S=2, heads=6, kv=3, D=10, rd=6, bias=True,
          layout="nk", config=tma(16, 32, 32), kernel="pointer"),
    # The GEMV kernel ([N, K] and int8 weights): M = 1 with an odd K, split-K with a ragged K (its partials
    # summed by the reduce and QKV epilogues), several M-tiles, and a [K, N] weight, which it does not
    # take (the pointer kernel runs, with the config's split).
    case("gemv-fp32-nk-M1-oddK", K=45, N=37, layout="nk", config=gemv(16, 16, 32)),
    case("gemv-fp16-int8-M2-g4-splitk2", dtype="fp16", B=2, S=1, K=70, N=48, layout="int8", groups=4,
         config=gemv(16, 16, 16, split=2)),
    case("gemv-fp16-nk-bias-splitk3", op="linear_layer", dtype="fp16", B=1, S=3, K=100, N=33, layout="nk",
         bias=True, config=gemv(16, 16, 16, split=3)),
    case("gemv-fp32-int8-2mtiles", B=2, S=9, K=40, N=21, layout="int8", groups=21, config=gemv(16, 32, 16)),
    case("gemv-fp16-int8-bias-evenk", op="linear_layer", dtype="fp16", B=1, S=5, K=64, N=40, layout="int8",
         groups=2, bias=True, config=gemv(16, 16, 32)),
    flash("qkv-fp16-gqa-gemv-splitk2", dtype="fp16", B=1, S=2, kv=2, rd=16, rotate_half=True, offset=50, bias=True,
          layout="nk", config=gemv(16, 32, 16, split=2)),
    flash("qkv-fp32-gemv-int8", B=1, S=1, heads=2, D=8, rd=8, layout="int8", groups=2, bias=True,
          config=gemv(16, 16, 16)),
    case("gemv-cfg-kn-runs-pointer", op="linear_layer", dtype="fp16", B=1, S=2, K=48, N=30, bias=True,
         config=gemv(16, 16, 16, split=2), kernel="pointer"),
    # The slices kernel (K split over the warps of a program): a K shorter than one chunk of slices, a ragged
    # last chunk, split-K over chunks (partials summed by the reduce and QKV epilogues), several M-tiles,
    # an even K, and a [K, N] weight (the pointer kernel runs, with the config's split).
    case("slices-fp32-nk-M1-K-below-a-chunk", K=45, N=37, layout="nk", config=slices(16, 16, 16, 4)),
    case("slices-fp16-int8-M2-g4-splitk2-ragged", dtype="fp16", B=2, S=1, K=150, N=48, layout="int8", groups=4,
         config=slices(16, 16, 16, 2, split=2)),
    case("slices-fp16-nk-bias-splitk3", op="linear_layer", dtype="fp16", B=1, S=3, K=200, N=33, layout="nk",
         bias=True, config=slices(16, 16, 16, 2, split=3)),
    case("slices-fp32-int8-2mtiles-8slices", B=2, S=9, K=300, N=21, layout="int8", groups=21,
         config=slices(16, 32, 16, 8)),
    case("slices-fp16-int8-bias-evenk", op="linear_layer", dtype="fp16", B=1, S=5, K=256, N=40, layout="int8",
         groups=2, bias=True, config=slices(16, 16, 32, 4)),
    flash("qkv-fp16-gqa-slices-splitk2", dtype="fp16", B=1, S=2, kv=2, rd=16, rotate_half=True, offset=50,
          bias=True, layout="nk", config=slices(16, 32, 16, 2, split=2)),
    case("slices-cfg-kn-runs-pointer", op="linear_layer", dtype="fp16", B=1, S=2, K=48, N=30, bias=True,
         config=slices(16, 16, 16, 2, split=2), kernel="pointer"),
]


def make_inputs(c, device, seed=0):
    """Random inputs for case `c` (never zeros) and the positional args of the op."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[c["dtype"]]
    B, S, K, N = c["B"], c["S"], c["K"], c["N"]
    x = torch.randn((B, S, K), generator=g)
    q_scale = None
    if c["layout"] == "int8":
        w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)  # -128 too: the PTX conversion's edge
        w[w == 0] = 1
        q_scale = (torch.rand(c["groups"], generator=g) + 0.5) / (64 * K ** 0.5)
    else:
        w = torch.randn((N, K) if c["layout"] == "nk" else (K, N), generator=g) / K ** 0.5
        w = w.to(dt)
    bias = torch.randn(N, generator=g).to(dt) if c["bias"] else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x.to(dt)), to(w), to(bias), to(q_scale)


def call(impl, c, x, w, bias, q_scale):
    tm = c["layout"] == "nk"
    if c["op"] == "vector_matmul":
        return [impl.vector_matmul(x, w, False, q_scale, c["layout"] == "int8", tm)]
    add_bias = c["bias"] is True
    return impl.linear_layer(x, w, bias, add_bias, c["heads"] > 0, c["heads"], tm, c["theta"], c["rd"],
                             c["rotate_half"], c["kv"], c["offset"], q_scale)


def check_case(c, device="cpu", seed=0):
    """Run case `c` through dsinf.triton and dsinf.reference; raise AssertionError on a mismatch."""
    from dsinf import reference
    from dsinf.triton import ops

    x, w, bias, q_scale = make_inputs(c, device, seed)
    if c["bias"] == "unused":  # add_bias=False with a bias given: it must be ignored
        bias = torch.randn(c["N"]).to(device=device, dtype=x.dtype)
    before = ops.launch_counts()
    if c["config"]:
        with ops.force_config(c["config"]):
            got = call(ops, c, x, w, bias, q_scale)
    else:
        got = call(ops, c, x, w, bias, q_scale)
    expect = c.get("kernel") or (ops.KERNEL_NAMES[c["config"].get("KERNEL", 0)] if c["config"] else None)
    ran = {k for k, v in ops.launch_counts().items() if v > before[k]}
    assert expect is None or ran == {expect}, f"expected the {expect} kernel to run, ran {ran}"
    want = call(reference, c, x.cpu(), w.cpu(), None if bias is None else bias.cpu(),
                None if q_scale is None else q_scale.cpu())
    assert len(got) == len(want)
    tol = TOL[c["dtype"]]
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype and g_.is_contiguous()
        torch.testing.assert_close(g_.cpu(), w_, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------------
# The interpreter worker


def _interpreter_problem() -> str | None:
    """Why this triton's interpreter cannot run our kernels here, or None: only the one known clash of two
    releases, triton <= 3.6's interpreter calling int() on 1-element arrays in `range(runtime bound)`, which
    NumPy >= 2.4 rejects (a TypeError). Any other failure of the probe is not a reason to skip: it kills the
    worker, and every case fails with its traceback."""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _loop(x_ptr, n):
        for i in range(0, n):
            tl.store(x_ptr + i, i)

    def release(version: str) -> tuple[int, int]:
        return tuple(int(part) for part in version.split(".")[:2])

    try:
        _loop[(1,)](torch.zeros(2), 2)
    except TypeError as exc:
        if release(triton.__version__) <= (3, 6) and release(numpy.__version__) >= (2, 4):
            return f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}: {exc!r}"
        raise
    return None


def _worker_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    problem = _interpreter_problem()
    cases = {c["id"]: c for c in CASES}
    for line in sys.stdin:
        req = json.loads(line)
        if problem:
            reply = {"skip": problem}
        else:
            try:
                t0 = time.perf_counter()
                if "case" in req:
                    check_case(cases[req["case"]])
                else:
                    globals()[req["call"]]()
                reply = {"ok": True, "s": round(time.perf_counter() - t0, 3)}
            except BaseException:  # noqa: BLE001 - every failure goes back to the test
                reply = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Worker:
    def __init__(self, cache_dir: Path, command: list[str] | None = None):
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), DSINF_CACHE_DIR=str(cache_dir))
        self.stderr = open(cache_dir / "worker.stderr", "w+")
        self.proc = subprocess.Popen(command or [sys.executable, __file__, "--worker"], env=env, cwd=str(REPO), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.death: str | None = None  # why the worker is gone; every later request fails with it

    def _stderr_tail(self, lines: int = 30) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return "\n".join(self.stderr.read().splitlines()[-lines:])

    def _died(self, req: dict) -> str:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stdout closed but the process lingers: still a dead worker
            self.proc.kill()
            rc = self.proc.wait()
        return (f"the interpreter worker died (exit code {rc}) while handling {req}; "
                f"last lines of its stderr:\n{self._stderr_tail()}")

    def ask(self, req: dict, timeout: float = 120) -> dict:
        if self.death:
            pytest.fail(self.death)
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # it died before this request (e.g. at start-up)
            self.death = self._died(req)
            pytest.fail(self.death)
        box = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if box and not box[0]:  # end of file: the worker exited
            self.death = self._died(req)
            pytest.fail(self.death)
        if not box:
            pytest.fail(f"interpreter worker gave no answer to {req} in {timeout} s (still running); "
                        f"last lines of its stderr:\n{self._stderr_tail()}")
        return json.loads(box[0])

    def close(self):
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.stderr.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("triton-interp"))
    yield w
    w.close()


def test_a_dead_worker_says_why_at_once(tmp_path):
    """A worker that dies at start-up (it once did, for want of numpy) fails the next request at once
    with its exit code and stderr, and every request after it with the same cause."""
    dies = [sys.executable, "-c", "import sys; sys.stderr.write('ImportError: no numpy here\\n'); sys.exit(3)"]
    w = Worker(tmp_path, dies)
    try:
        start = time.monotonic()
        for req in ({"case": "first"}, {"case": "second"}):
            with pytest.raises(pytest.fail.Exception) as info:
                w.ask(req, timeout=60)
            message = str(info.value)
            assert "died (exit code 3)" in message and "ImportError: no numpy here" in message, message
            assert "'first'" in message and "BrokenPipe" not in message, message
        assert time.monotonic() - start < 30, "a dead worker must not be waited for"
    finally:
        w.close()


def _answer(reply: dict) -> None:
    if "skip" in reply:
        pytest.skip(reply["skip"])
    assert reply["ok"], reply["error"]


@pytest.mark.parametrize("c", CASES, ids=[c["id"] for c in CASES])
def test_interpreter_matches_reference(worker, c):
    _answer(worker.ask({"case": c["id"]}))


def _bad_inputs_are_refused():
    from dsinf.checks import InputError
    from dsinf.triton import ops

    x = torch.randn(1, 2, 8)
    w = torch.randn(8, 4)
    try:
        ops.vector_matmul(x, w.half())
    except InputError as exc:
        assert exc.arg == "weight" and exc.op == "vector_matmul"
    else:
        raise AssertionError("a weight of another dtype was accepted")
    try:  # bf16 on the interpreter would be silently wrong: it is refused instead
        ops.linear_layer(x.bfloat16(), w.bfloat16(), None, False, False, 1, op="linear_layer_bf16")
    except InputError as exc:
        assert "bfloat16" in str(exc) and exc.op == "linear_layer_bf16"
    else:
        raise AssertionError("bf16 ran on the interpreter")


def _empty_and_degenerate_shapes():
    from dsinf import reference
    from dsinf.triton import ops

    x = torch.randn(2, 0, 8)
    w = torch.randn(8, 5)
    assert ops.vector_matmul(x, w).shape == (2, 0, 5)
    x, b = torch.randn(1, 2, 8), torch.randn(5)
    out = ops.linear_layer(x[..., :0], w[:0], b, True, False, 1)[0]  # K == 0: the bias alone
    torch.testing.assert_close(out, reference.linear_layer(x[..., :0], w[:0], b, True, False, 1)[0])


def _autotune_table_drives_the_launch():
    """autotune_vector_matmul with an injected do_bench: every candidate really launches (under the
    interpreter), the fake timing makes the LAST candidate win, the table records it, and the op then
    runs with exactly that config and still matches the reference."""
    from dsinf import reference
    from dsinf.triton import autotune, ops

    autotune.reset()
    K = N = 48
    launched = []

    def do_bench(fn):
        fn()
        launched.append(1)
        return 100.0 - len(launched)  # strictly decreasing: the last candidate is fastest

    chosen = ops.autotune_vector_matmul(1, 3, K, torch.float16, transposed_mode=True, do_bench=do_bench)
    assert sorted(chosen) == [1, 2, 4]
    info = ops._device_info("cpu", None)
    cands = ops.candidates(4, N, K, "nk", 2, info.sms, info.smem)
    assert autotune.stats()["benchmarks_run"] == len(launched) == 3 * (len(cands) + autotune.CONFIRM_TOP)
    assert chosen[4] == cands[-1]
    entry = json.loads(autotune.table_path().read_text())["entries"]
    assert ops.tune_key(torch.device("cpu"), torch.float16, "nk", 4, N, K).text in entry
    assert ops.config_for(torch.device("cpu"), torch.float16, "nk", 3, N, K) == cands[-1]
    x = torch.randn(1, 3, K).half()
    w = (torch.randn(N, K) / K ** 0.5).half()
    torch.testing.assert_close(ops.vector_matmul(x, w, transposed_mode=True),
                               reference.vector_matmul(x, w, transposed_mode=True), atol=2e-3, rtol=2e-3)
    # re-running the warm-up benchmarks nothing
    before = autotune.stats()["benchmarks_run"]
    ops.autotune_vector_matmul(1, 3, K, torch.float16, transposed_mode=True, do_bench=do_bench)
    assert autotune.stats()["benchmarks_run"] == before


def _invalid_table_entry_is_ignored():
    """A hand-edited (or foreign) entry that the kernel cannot run is not used: the default is."""
    from dsinf.triton import autotune, ops

    autotune.reset()
    dev = torch.device("cpu")
    good = dict(ops.default_config(2, 24, 40, "kn", 4), BLOCK_N=16)
    assert good != ops.default_config(2, 24, 40, "kn", 4)
    autotune.record(ops.tune_key(dev, torch.float32, "kn", 2, 24, 40), good, 0.1)
    assert ops.config_for(dev, torch.float32, "kn", 2, 24, 40) == good  # a valid entry is used ...
    for bad in ({"BLOCK_M": 3}, dict(good, BLOCK_K=24), dict(good, num_warps=3)):  # ... an invalid one is not
        autotune.record(ops.tune_key(dev, torch.float32, "kn", 2, 24, 40), bad, 0.1)
        assert ops.config_for(dev, torch.float32, "kn", 2, 24, 40) == ops.default_config(2, 24, 40, "kn", 4)


def _ran(ops, before) -> set:
    return {k for k, v in ops.launch_counts().items() if v > before[k]}


def _tma_needs_aligned_operands():
    """Under a forced TMA config: operands a TMA descriptor can describe run on the TMA kernel (a strided
    input whose row stride is a multiple of 16 bytes included); a base pointer or row stride that is
    not 16-byte aligned runs on the pointer kernel. Every result matches the reference."""
    from dsinf import reference
    from dsinf.triton import ops

    M, K, N = 21, 48, 40
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g).half()  # noqa: E731
    w_nk = (torch.randn(N, K, generator=g) / K ** 0.5).half()
    bias = rand(N)
    cases = {
        "contiguous": (rand(1, M, K), w_nk, "tma"),
        "x rows 16-byte strided": (rand(1, M, K + 8)[..., :K], w_nk, "tma"),
        "x rows 2-byte strided": (rand(1, M, K + 1)[..., :K], w_nk, "pointer"),
        "x base misaligned": (rand(M * K + 1)[1:].view(1, M, K), w_nk, "pointer"),
        "weight base misaligned": (rand(1, M, K), (rand(N * K + 3) / K ** 0.5)[3:].view(N, K), "pointer"),
    }
    for kernel in (1, 2):
        for what, (x, w, expect) in cases.items():
            assert w.is_contiguous()
            before = ops.launch_counts()
            with ops.force_config(dict(ops._config(16, 32, 16, kernel=kernel), GROUP_M=2)):
                got = ops.linear_layer(x, w, bias, True, False, 1, True)[0]
            want = reference.linear_layer(x, w, bias, True, False, 1, True)[0]
            expect = ops.KERNEL_NAMES[kernel] if expect == "tma" else expect
            assert _ran(ops, before) == {expect}, (kernel, what, _ran(ops, before))
            torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=lambda m: f"{kernel} {what}: {m}")


def _table_entries_with_and_without_kernel_key():
    """Persisted entries: one without KERNEL (written before the TMA kernels) is a pointer config; one
    with KERNEL 1 or 2 runs that TMA kernel, with 3 the GEMV kernel, with 4 the slices kernel; a KERNEL the
    ops do not know, or a TMA entry with split-K, a block larger than a TMA box, a subtile on the pointer
    kernel, or K-slices on a kernel other than the slices kernel (or not a power of two), is ignored (the
    default runs)."""
    from dsinf.triton import autotune, ops

    autotune.reset()
    dev, M, K, N = torch.device("cpu"), 150, 64, 48
    key = ops.tune_key(dev, torch.float16, "nk", M, N, K)
    x = torch.randn(1, M, K).half()
    w = (torch.randn(N, K) / K ** 0.5).half()
    want = x.float() @ w.float().T
    old = cfg(32, 16, 32, group=4)  # the pre-TMA format: no KERNEL, no EPILOGUE_SUBTILE
    assert ops.valid_config(old) and "KERNEL" not in old
    for entry, expect in ((old, "pointer"), (tma(32, 16, 32), "tma"), (tma_persistent(32, 32, 16, subtile=1),
                                                                       "tma-persistent"), (gemv(16, 16, 32), "gemv"),
                          (slices(16, 16, 16, 4), "gemv-slices")):
        autotune.record(key, entry, 0.1)
        chosen = ops.config_for(dev, torch.float16, "nk", M, N, K)
        assert chosen == {**ops.OPTIONAL_KEYS, **entry}, chosen
        before = ops.launch_counts()
        got = ops.vector_matmul(x, w, transposed_mode=True)
        assert _ran(ops, before) == {expect}
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    default = ops.default_config(M, N, K, "nk", 4, True)
    for bad in (cfg(32, 16, 32, kernel=5), dict(tma(32, 16, 32), SPLIT_K=2), tma(512, 16, 32),
                cfg(32, 32, 32, subtile=1), tma(32, 16, 32, subtile=1), dict(old, EXTRA=1),
                cfg(32, 16, 32, slices=2), gemv(16, 16, 32) | {"SLICES": 4}, slices(16, 16, 16, 3),
                slices(16, 16, 16, 32)):
        assert not ops.valid_config(bad), bad
        autotune.record(key, bad, 0.1)
        assert ops.config_for(dev, torch.float16, "nk", M, N, K) == default


def _autotune_races_both_kernels():
    """autotune_matmul at M > 128: the candidates of the pointer kernel and of both TMA kernels really
    launch (each on its own kernel, counted), the fake timing crowns a persistent TMA config, the table
    records it, and the op then runs it. A problem TMA cannot serve (N % 8 != 0) gets no TMA candidates."""
    from dsinf import reference
    from dsinf.triton import autotune, ops

    autotune.reset()
    K, N, M = 64, 40, 150
    info = ops._device_info("cpu", None)
    ran = []
    speed = {"pointer": 3.0, "tma": 2.0, "tma-persistent": 1.0}

    def do_bench(fn):
        before = ops.launch_counts()
        fn()
        (kernel,) = _ran(ops, before)
        ran.append(kernel)
        return speed[kernel] + 0.001 * len(ran)  # among the persistent ones, the first wins

    chosen = ops.autotune_matmul(M, M, K, N, torch.float16, transposed_mode=True, do_bench=do_bench)
    cands = ops.candidates(M, N, K, "nk", 2, info.sms, info.smem, True)
    kinds = [ops.KERNEL_NAMES[c["KERNEL"]] for c in cands]
    assert ran[:len(cands)] == kinds and {"pointer", "tma", "tma-persistent"} <= set(kinds)
    best = cands[kinds.index("tma-persistent")]
    assert chosen == {autotune.m_bucket(M): best}
    assert ops.config_for(torch.device("cpu"), torch.float16, "nk", M, N, K) == best
    x = torch.randn(1, M, K).half()
    w = (torch.randn(N, K) / K ** 0.5).half()
    before = ops.launch_counts()
    torch.testing.assert_close(ops.vector_matmul(x, w, transposed_mode=True),
                               reference.vector_matmul(x, w, transposed_mode=True), atol=2e-3, rtol=2e-3)
    assert _ran(ops, before) == {"tma-persistent"}
    assert all(c["KERNEL"] == 0 for c in ops.candidates(M, N + 2, K, "nk", 2, info.sms, info.smem,
                                                        ops.tma_eligible(info, "nk", 2, N + 2, K)))
    assert all(c["KERNEL"] == 0 for c in ops.candidates(M, N, K, "int8", 2, info.sms, info.smem,
                                                        ops.tma_eligible(info, "int8", 2, N, K)))


@pytest.mark.parametrize("name", ["_bad_inputs_are_refused", "_empty_and_degenerate_shapes",
                                  "_autotune_table_drives_the_launch", "_invalid_table_entry_is_ignored",
                                  "_tma_needs_aligned_operands", "_table_entries_with_and_without_kernel_key",
                                  "_autotune_races_both_kernels"])
def test_interpreter_behaviour(worker, name):
    _answer(worker.ask({"call": name}))


INTERPRET_CHILD = r"""
import json, sys, torch
import dsinf
from dsinf import reference, triton as dt
from dsinf.dispatch import BackendUnavailableError

out = {"before": dt.supports(torch.float32, "cpu")[0]}  # before our kernels are imported
op = dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32))
x, w = torch.randn(1, 2, 8), torch.randn(8, 4)
try:
    y = op(x, w)
    out["call"] = "matches" if torch.allclose(y, reference.vector_matmul(x, w), atol=1e-5) else "differs"
except BackendUnavailableError:
    out["call"] = "unavailable"
except Exception as exc:  # what a wrong decision ends in: the kernels handed CPU tensors
    out["call"] = f"{type(exc).__name__}: {exc}"[:300]
from dsinf.triton import ops
out["interpreted"] = ops.INTERPRETED  # what triton made of our kernels
out["after"] = dt.supports(torch.float32, "cpu")[0]
print(json.dumps(out))
"""


@pytest.mark.parametrize("value", ["t", " 1", "1 ", "2", "true", "1", "0"])
def test_interpreter_mode_is_tritons_own(tmp_path, value):
    """dsinf serves CPU tensors with Triton only under the interpreter, and the interpreter is on when triton
    says so, not when a parse of our own does: triton 3.x reads "t" or " 1" as off. Each value in a fresh
    process with DSINF_BACKEND=triton (triton fixes the mode when it decorates our kernels)."""
    env = dict(os.environ, TRITON_INTERPRET=value, DSINF_BACKEND="triton", PYTHONPATH=str(REPO),
               DSINF_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", INTERPRET_CHILD], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == out["interpreted"] == out["after"], out
    assert out["call"] == ("matches" if out["interpreted"] else "unavailable"), out
    if value in ("1", "true"):
        assert out["interpreted"], out  # the values every dsinf and triton read as on really are


#: The compiled path's decode defaults on an H200 or H100 (both 132 SMs), as measured (docs/PERFORMANCE.md,
#: fifth, tenth, thirty-first and forty-first rounds): (K, N, layout, bf16) -> (kernel, BLOCK_N, BLOCK_K, SPLIT_K,
#: warps, stages, SLICES).
H200_DECODE_DEFAULTS = {
    (4096, 12288, "nk", False): ("gemv", 128, 128, 1, 8, 4, 1),
    (14336, 4096, "nk", True): ("gemv", 64, 256, 2, 4, 4, 1),
    (4096, 12288, "int8", False): ("gemv", 32, 256, 1, 4, 5, 1),
    (4096, 4096, "int8", False): ("gemv-slices", 16, 128, 1, 4, 5, 4),  # H100 41st round, H200 43rd (M = 1)
    (4096, 4096, "int8", True): ("gemv-slices", 16, 128, 1, 4, 5, 4),
    (4096, 12288, "int8", True): ("pointer", 32, 256, 1, 4, 5, 1),
    (14336, 4096, "int8", False): ("gemv-slices", 16, 128, 1, 4, 5, 4),  # H100, forty-first round
    (14336, 4096, "int8", True): ("gemv-slices", 16, 128, 1, 4, 5, 4),
    (4096, 14336, "int8", False): ("pointer", 64, 256, 1, 4, 3, 1),
    (4096, 14336, "int8", True): ("pointer", 64, 256, 1, 4, 3, 1),  # H100, thirty-ninth round
    (4096, 12288, "kn", False): ("pointer", 64, 256, 1, 4, 3, 1),
    (14336, 4096, "kn", False): ("pointer", 64, 256, 2, 4, 3, 1),  # tenth round (run 45)
    (4096, 4096, "kn", False): ("pointer", 32, 128, 1, 4, 5, 1),  # tenth round (run 47)
    (4096, 4096, "nk", False): ("gemv", 64, 256, 1, 4, 4, 1),  # unsplit: H100, thirty-first round
    (4096, 4096, "nk", True): ("gemv", 64, 256, 1, 4, 4, 1),
    # not measured: a short K with too few tiles to fill a third of the GPU keeps the split
    (4096, 1024, "nk", False): ("gemv", 64, 256, 8, 4, 4, 1),
    # not measured: K >= 2N with a grid that would pass two waves at split 4; a K too short to split
    (28672, 8192, "int8", False): ("pointer", 64, 256, 2, 4, 3, 1),
    (1000, 260, "int8", False): ("gemv-slices", 16, 128, 1, 4, 5, 4),
}


@pytest.mark.parametrize("shape", list(H200_DECODE_DEFAULTS), ids=lambda k: "-".join(map(str, k)))
def test_decode_defaults_on_an_h200(monkeypatch, shape):
    """The compiled path's decode defaults pick the measured tiles, and every split keeps two K-tiles and
    at most two waves of programs."""
    from dsinf.triton import ops

    monkeypatch.setattr(ops, "INTERPRETED", False)  # the defaults a GPU gets, not the interpreter's
    K, N, layout, bf16 = shape
    for M in (1, 8, 16):
        cfg = ops.default_config(M, N, K, layout, 132, layout != "int8", bf16)
        got = (ops.KERNEL_NAMES[cfg["KERNEL"]], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"], cfg["num_warps"],
               cfg["num_stages"], cfg["SLICES"])
        assert got == H200_DECODE_DEFAULTS[shape], (M, cfg)
        assert ops.valid_config(cfg) and ops._fits(cfg, 2, 1 if layout == "int8" else 2, 227 * 1024)
        if cfg["SPLIT_K"] > 1:
            assert (K >= 2 * cfg["BLOCK_K"] * cfg["SLICES"] * cfg["SPLIT_K"]
                    and -(-N // cfg["BLOCK_N"]) * cfg["SPLIT_K"] <= 2 * 132)


def test_defaults_lose_pipeline_stages_on_a_smaller_gpu(monkeypatch):
    """An sm_86/89 GPU has 99 KiB of shared memory per block: the H200 decode defaults that do not fit
    there (128x128 x 4 stages: 144 KiB) run with fewer stages, the tiles unchanged."""
    from dsinf.triton import ops

    monkeypatch.setattr(ops, "INTERPRETED", False)
    small = 99 * 1024
    cfg = ops.default_config(1, 12288, 4096, "nk", 84, False)
    assert not ops._fits(cfg, 2, 2, small)
    fitted = ops._fitting(cfg, 2, 2, small)
    assert ops._fits(fitted, 2, 2, small) and 1 <= fitted["num_stages"] < cfg["num_stages"]
    assert {k: v for k, v in fitted.items() if k != "num_stages"} == {k: v for k, v in cfg.items() if k != "num_stages"}


# --------------------------------------------------------------------------------------------------
# GPU


def _gpu_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if knobs.get("TRITON_INTERPRET"):  # read as the library reads it
        return "TRITON_INTERPRET is set in this process"
    return None


requires_gpu = pytest.mark.skipif(_gpu_ready() is not None, reason=str(_gpu_ready()))


def _poison_allocator():
    """Fill the caching allocator's free blocks with NaN, so an output element a kernel forgets to
    write shows up as NaN instead of a plausible leftover."""
    blocks = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(16)]
    blocks.append(torch.full((64 << 20,), float("nan"), device="cuda"))
    del blocks


GPU_M = [1, 2, 3, 8, 16, 17, 64, 2048]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("M", GPU_M)
@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("op", ["vector_matmul", "linear_layer"])
def test_gpu_matches_reference(op, dtype, layout, M):
    B = 2 if M % 2 == 0 and M > 2 else 1
    c = case(f"gpu-{op}", op=op, dtype=dtype, B=B, S=M // B, K=1004, N=1029, layout=layout, groups=7,
             bias=op == "linear_layer")
    _poison_allocator()
    check_case(c, device="cuda", seed=M)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_kn_long_k_default(dtype, M):
    """[K, N] decode with a long K and few 64-column tiles runs the default that splits them (64x256, the
    split-K reduce): K = 8200 (a partial K-tile), N = 1032 (a partial N-tile)."""
    from dsinf.triton import ops

    K, N = 8200, 1032
    info = ops._device_info("cuda", torch.cuda.current_device())
    cfg = ops._device_default(M, N, K, "kn", 2, info.sms, info.smem)
    assert cfg["BLOCK_N"] == 64 and cfg["SPLIT_K"] > 1, cfg
    _poison_allocator()
    check_case(case(f"gpu-kn-long-k-{dtype}-M{M}", dtype=dtype, S=M, K=K, N=N, layout="kn", config=cfg), device="cuda",
               seed=M)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("K, M", [(4096, 1), (1032, 8), (8200, 1)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_decode_chain_back_to_back(dtype, K, M):
    """On sm_90+ the decode launches use programmatic dependent launch (`ops._pdl`): a kernel may start while
    the previous one finishes and must wait for it before it reads. A chain of [K, K] calls, each reading
    the previous output, replayed as a CUDA graph over NaN-filled outputs; each link against the reference.
    1032 at M = 8 takes a split-K reduce between the links; 8200 a 64-column default without split. This
    shows chained results stay right under PDL; it did not catch the matmul's wait removed (H200, run 49:
    the next kernel is scheduled only after the K loop, and its programs started after the stores landed)."""
    from dsinf import reference
    from dsinf.triton import ops

    dt = DTYPES[dtype]
    assert ops._pdl(torch.device("cuda", torch.cuda.current_device()), M) == (
        torch.cuda.get_device_capability()[0] >= 9), "the launch is not the one this GPU should get"
    gen = torch.Generator().manual_seed(K + M)
    ws = [(torch.randn(K, K, generator=gen) / K ** 0.5).to(dt).cuda() for _ in range(6)]
    x = torch.randn(1, M, K, generator=gen).to(dt).cuda()

    def chain():
        ys = [x]
        for w in ws:
            ys.append(ops.vector_matmul(ys[-1], w))
        return ys

    chain()  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = chain()
    tol = TOL[dtype]
    for _ in range(3):
        for y in ys[1:]:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, w in enumerate(ws):
            want = reference.vector_matmul(ys[i].cpu(), w.cpu())
            torch.testing.assert_close(ys[i + 1].cpu(), want, atol=tol, rtol=tol)


#: GEMV-kernel and slices-kernel configs at production tile sizes, without and with split-K.
GPU_GEMV_CONFIGS = {"64x256-w4s4": gemv(16, 64, 256, 1, 4, 4), "128x128-w8s4": gemv(16, 128, 128, 1, 8, 4),
                    "128x128-w8s4-split4": gemv(16, 128, 128, 4, 8, 4),
                    "slices-16x128x4-w4s3": slices(16, 16, 128, 4, 1, 4, 3),
                    "slices-32x64x8-w8s4-split2": slices(16, 32, 64, 8, 2, 8, 4)}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("config", list(GPU_GEMV_CONFIGS))
@pytest.mark.parametrize("M", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("layout", ["nk", "int8"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_gemv_kernel(dtype, layout, M, config):
    """The GEMV kernels compiled for the GPU (bf16 included, which the interpreter cannot check), K and N
    not multiples of the blocks; linear_layer with a bias on the split-K configs."""
    op = "linear_layer" if "split" in config else "vector_matmul"
    c = case(f"gpu-gemv-{config}", op=op, dtype=dtype, B=1, S=M, K=1004, N=1029, layout=layout, groups=7,
             bias=op == "linear_layer", config=GPU_GEMV_CONFIGS[config])
    _poison_allocator()
    check_case(c, device="cuda", seed=M)


#: One config per kernel that converts int8 weights in registers (the PTX byte tricks of `kernels._int8_to`).
INT8_KERNEL_CONFIGS = {"pointer": cfg(16, 32, 64, 1, 4, 2), "gemv": gemv(16, 32, 64, 1, 4, 2),
                       "gemv-slices": slices(16, 32, 32, 2, 1, 2, 2)}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("kernel", list(INT8_KERNEL_CONFIGS))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_int8_conversion_is_exact(dtype, kernel):
    """Every int8 value at every byte position of a packed word, converted by the compiled kernel, exactly:
    x is one-hot (row m selects column m of W, positions 0-7 of two words) and the scale is 1, so out[m, n]
    must equal W[n, m] bit for bit (integers in [-128, 127] are exact in fp16 and bf16, and the fp32 sum
    adds zeros). A tolerance-based parity check could miss one wrong value out of 256."""
    from dsinf.triton import ops

    dt = DTYPES[dtype]
    N, K, M = 256, 64, 8
    n = torch.arange(N)[:, None]
    k = torch.arange(K)[None, :]
    w = ((n + 37 * k) % 256 - 128).to(torch.int8)  # each column holds all 256 values
    x = torch.eye(M, K, dtype=dt)[None]
    with ops.force_config(INT8_KERNEL_CONFIGS[kernel]):
        before = ops.launch_counts()
        got = ops.vector_matmul(x.cuda(), w.cuda(), False, torch.ones(1, device="cuda"), True, True)
        ran = {name for name, v in ops.launch_counts().items() if v > before[name]}
    assert ran == {kernel}, f"expected the {kernel} kernel to run, ran {ran}"
    want = w[:, :M].T.to(dt)[None]
    mismatch = (got.cpu() != want).nonzero()
    assert mismatch.numel() == 0, (f"{len(mismatch)} of {M * N} outputs differ; first at (m, n) = "
                                   f"{tuple(mismatch[0, 1:].tolist())}: got {got.cpu()[tuple(mismatch[0])]}, "
                                   f"want {want[tuple(mismatch[0])]}")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("S, offset", [(1, 4095), (64, 0), (7, 30000), (200, 17)])
@pytest.mark.parametrize("kv, rotate_half, rd", [(-1, True, 128), (8, False, 128), (2, True, 32)])
def test_gpu_qkv_rope(dtype, split, S, offset, kv, rotate_half, rd):
    c = flash("gpu-qkv", dtype=dtype, B=2, S=S, heads=16, kv=kv, D=128, rd=rd, rotate_half=rotate_half,
              offset=offset, bias=True, config=cfg(16 if S < 32 else 64, 64, 64, split, 4, 3))
    _poison_allocator()
    check_case(c, device="cuda")


def _no_tma() -> str | None:
    if _gpu_ready() is not None:
        return _gpu_ready()
    if torch.cuda.get_device_capability() < (9, 0):
        return f"compute capability {torch.cuda.get_device_capability()} < 9.0: no TMA"
    return None


requires_tma = pytest.mark.skipif(_no_tma() is not None, reason=str(_no_tma()))
#: Configs of the TMA kernels at production tile sizes; None = the default (no table entry).
GPU_TMA_CONFIGS = {"default": None, "tma-128x128x64-w4s4": dict(tma(128, 128, 64), num_warps=4, num_stages=4),
                   "tma-128x256x64-w8s3": dict(tma(128, 256, 64), num_warps=8, num_stages=3),
                   "persistent-128x128x64-w4s4": dict(tma_persistent(128, 128, 64), num_warps=4, num_stages=4),
                   "persistent-128x256x64-w8s3-subtile": dict(tma_persistent(128, 256, 64, subtile=1), num_warps=8,
                                                              num_stages=3)}


@pytest.mark.gpu
@requires_tma
@pytest.mark.parametrize("M, K, N, bias", [(2048, 4096, 12288, True), (300, 1000, 1032, False)])
@pytest.mark.parametrize("config", list(GPU_TMA_CONFIGS))
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_tma_prefill(dtype, layout, config, M, K, N, bias, tmp_path, monkeypatch):
    """On sm_90+: the TMA kernels at M > 128 match F.linear and an fp32 reference, at the issue's shape
    and at a ragged one (M, K, N not multiples of the blocks); with no table entry, [N, K] runs on the
    persistent TMA kernel (the default) and [K, N] on the pointer kernel; a forced config runs its own kernel."""
    import torch.nn.functional as F
    from dsinf.triton import autotune, ops

    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))  # an empty table: the default config runs
    autotune.reset()
    dt = DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn((1, M, K), generator=g, device="cuda").to(dt)
    w = (torch.randn((N, K) if layout == "nk" else (K, N), generator=g, device="cuda") / K ** 0.5).to(dt)
    b = torch.randn(N, generator=g, device="cuda").to(dt) if bias else None
    cfg_ = GPU_TMA_CONFIGS[config]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default_kernel = ops.KERNEL_NAMES[ops.default_config(M, N, K, layout, sms, True)["KERNEL"]]
    assert default_kernel == ("tma-persistent" if layout == "nk" else "pointer")
    expect = ops.KERNEL_NAMES[cfg_["KERNEL"]] if cfg_ else default_kernel
    _poison_allocator()
    before = ops.launch_counts()
    with ops.force_config(cfg_) if cfg_ else contextlib.nullcontext():
        got = ops.linear_layer(x, w, b, bias, False, 1, layout == "nk")[0]
    torch.cuda.synchronize()
    assert {k for k, v in ops.launch_counts().items() if v > before[k]} == {expect}
    w_nk = w if layout == "nk" else w.T
    want = F.linear(x.float(), w_nk.float(), None if b is None else b.float())
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got, F.linear(x, w_nk, b), atol=2 * TOL[dtype], rtol=2 * TOL[dtype])


@pytest.mark.gpu
@requires_gpu
def test_gpu_second_process_runs_zero_benchmarks(tmp_path):
    code = """
import json, torch
from dsinf.triton import autotune, ops
chosen = ops.autotune_vector_matmul(1, 20, 512, torch.float16, transposed_mode=True)
x = torch.randn(1, 5, 512, device="cuda", dtype=torch.float16)
w = torch.randn(512, 512, device="cuda", dtype=torch.float16)
ops.vector_matmul(x, w, transposed_mode=True)
torch.cuda.synchronize()
print(json.dumps({"chosen": {str(k): v for k, v in chosen.items()}, "stats": autotune.stats()}))
"""
    env = dict(os.environ, DSINF_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["stats"]["benchmarks_run"] > 0 and first["stats"]["writes"] == len(first["chosen"]) == 6
    assert second["stats"]["benchmarks_run"] == 0 and second["stats"]["writes"] == 0
    assert second["chosen"] == first["chosen"]


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
