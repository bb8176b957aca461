"""Shared constants and checks of the kernel tests (imported by name: pytest's
default prepend import mode puts this folder on sys.path)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"

# The interpreter computes bf16 wrongly, so bf16 runs only when compiled.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def assert_close(out, ref, atol, rtol=0.0, name="out"):
    """Max-abs comparison in fp32 with a readable failure; NaN never passes."""
    out, ref = out.float(), ref.float()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{name}: {int(out.isnan().sum())} NaN (unwritten or invalid)"
    err = (out - ref).abs()
    excess = (err - (atol + rtol * ref.abs())).max().item()
    assert excess <= 0, f"{name}: max abs err {err.max().item():.3g} (atol {atol}, rtol {rtol})"
