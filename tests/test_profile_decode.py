"""tools/profile_decode.py's per-step rows, from real profiler output on CPU (the tool itself needs a GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import profile_decode  # noqa: E402


def _averages(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages()


def test_per_step_rows_leave_the_prefill_out():
    a, b = torch.randn(48, 48), torch.randn(48, 48)

    def generate(new):  # a "prefill" matmul, then one add and one mul per further token
        torch.mm(a, b)
        for _ in range(new - 1):
            torch.mul(torch.add(a, b), 2.0)

    full, one = _averages(lambda: generate(5)), _averages(lambda: generate(1))
    rows = {r.key: r for r in profile_decode.per_step(full, one, 4)}
    assert rows["aten::add"].count == 1.0 and rows["aten::mul"].count == 1.0
    assert rows["aten::mm"].count == 0.0  # the prefill's op is in both calls: no per-step share
    assert rows["aten::add"].host_ms > 0 and rows["aten::add"].device_ms == 0.0  # CPU only: no device time


def test_new_below_two_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        profile_decode.main(["dsinf:1", "--new", "1"])
    assert "--new must be at least 2" in capsys.readouterr().err


def test_wall_times_are_seconds_not_bench_e2e_s_range_tuples():
    """The tool's wall times come from bench.e2e.timed, which returns (median, fastest, slowest): the tool
    subtracts and scales the median (a tuple there was a TypeError, found only on the GPU machine)."""
    calls = []
    wall = profile_decode.median_s(lambda: calls.append(1), "cpu", 3)
    assert isinstance(wall, float) and 0 <= wall < 1 and len(calls) == 3
