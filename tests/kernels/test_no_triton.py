"""The torch references must import and run where Triton is not installed."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
sys.modules["triton.language"] = None
import torch
from kernels.rms_norm import rms_norm, rms_norm_triton
from kernels.swiglu import swiglu
from kernels.attention import varlen_attention
x = torch.randn(3, 8)
out, _ = rms_norm(x, torch.ones(8), 1e-6)
assert out.shape == (3, 8) and swiglu(x).shape == (3, 4)
q = torch.randn(4, 2, 16)
cu = torch.tensor([0, 1, 4], dtype=torch.int32)
assert varlen_attention(q, q, q, cu, cu, causal=True, scale=0.25).shape == q.shape
try:
    rms_norm_triton(x, torch.ones(8), 1e-6)
except RuntimeError as exc:
    assert "Triton is not installed" in str(exc)
else:
    raise AssertionError("rms_norm_triton ran without triton")
print("ok")
"""


def test_references_import_without_triton():
    env = {"PATH": "", "PYTHONPATH": str(ROOT), "ENGINE_KERNELS": "torch"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
