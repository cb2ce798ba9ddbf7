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


def _variant_cmd(argv: list[str]) -> list[str]:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import probe_gemv
    finally:
        sys.path.pop(0)
    args = probe_gemv.build_parser().parse_args(argv)
    return probe_gemv.variant_cmd(args, tuple(args.variant[0].split()))


def test_variant_children_get_the_selection_and_no_parity_only_when_asked():
    """A sweep's child builds its variant and times what the parent selected; it checks parity unless the
    parent was given --no-parity (a diagnostic define may compute wrong results on purpose)."""
    cmd = _variant_cmd(["--variant", "A=1 B=2", "--layouts", "nk", "--ms", "1,8", "--shapes", "4096x4096"])
    assert "--no-parity" not in cmd
    assert cmd[cmd.index("--define") + 1] == "A=1" and "B=2" in cmd
    assert cmd[cmd.index("--layouts") + 1] == "nk" and cmd[cmd.index("--ms") + 1] == "1,8"
    assert cmd[cmd.index("--shapes") + 1] == "4096x4096"
    assert "--no-parity" in _variant_cmd(["--no-parity", "--variant", "A=1"])
