"""tools/probe_gemv.py's read ceiling: the kernel that only reads a weight's bytes (its time is what no GEMV
of those bytes can beat) reads every word once. Run through Triton's interpreter on CPU tensors, in a child:
triton chooses interpreter or compiler when it is imported."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import probe_gemv
for n, per_prog, block in ((5000, 1024, 256), (4096, 2048, 1024), (777, 256, 128)):
    buf = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    out = torch.full((-(-n // per_prog) + 1,), 12345, dtype=torch.int32)
    probe_gemv.read_words(buf, out, per_prog, block, 4)
    want = torch.stack([buf[i:i + per_prog].sum() for i in range(0, n, per_prog)]).to(torch.int32)
    assert torch.equal(out[:len(want)], want), (n, per_prog, block, out, want)
    assert out[len(want)] == 12345, "a program past the last range"
print("OK")
"""


def test_read_kernel_reads_every_word_once():
    pytest.importorskip("triton")
    p = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(ROOT, "tools")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT})
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stderr[-3000:]
