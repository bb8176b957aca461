"""No batch size adds a compiled variant of any Triton kernel.

Method (CPU only; see kernels/variants.py): over 40 batch compositions (1 to 100 sequences,
1 to 1,000 tokens each) at the shapes of Qwen3-0.6B, Qwen3.5-0.8B (DeltaNet), T5Gemma2-270M,
MiniLM-L6 and the Qwen3-VL vision tower, the real host wrappers run on ``meta`` tensors and
``JITFunction.run`` records each launch; Triton's own binder (``create_function_from_signature``
+ ``_pack_args``, with a backend built for sm_90) then computes each launch's specialisation
key, i.e. what ``JITFunction.run`` looks up in its cache before compiling: the constexprs,
options, and each argument's type, equal-to-1 constexpr and divisible-by-16 attribute,
honouring ``do_not_specialize``. Distinct keys are distinct compiles on a GPU.

Runs in a subprocess with TRITON_INTERPRET unset: this process has the interpreter on, which
replaces the JIT functions whose binder the count relies on.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Tile configurations that the batch is allowed to pick, as buckets: the delta-rule chunk
# (16 / 32 / 64 by the longest sequence, kernels.gated_delta_rule.pick_chunk).
BUCKETED = {"_gdr_chunk_prepare_kernel": {"BT"}, "_gdr_chunk_scan_kernel": {"BT"}}


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ENGINE_KERNELS")}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants") / "variants.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.variants", "--count", "40", "--json", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"kernels/variants.py wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc, json.loads(out.read_text())


def test_every_served_kernel_is_counted(report):
    _, data = report
    assert data["batches"] == 40
    expected = {"_rms_norm_kernel", "_swiglu_kernel", "_yes_no_head_kernel", "_qk_norm_rope_kernel",
                "_varlen_attention_kernel", "_paged_attention_kernel", "_causal_conv1d_kernel",
                "_conv_final_state_kernel", "_gdr_chunk_prepare_kernel", "_gdr_chunk_scan_kernel"}
    assert expected <= set(data["kernels"]), sorted(expected - set(data["kernels"]))


def test_one_variant_per_tile_configuration(report):
    proc, data = report
    added = {name: k["batch_added"][:4] for name, k in data["kernels"].items() if k["batch_added"]}
    assert not added, f"the batch changed an argument's specialisation:\n{json.dumps(added, indent=1)}"
    for name, k in data["kernels"].items():
        assert k["variants"] == k["configs"], (name, k)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_batch_picks_no_tile_configuration_outside_its_buckets(report):
    _, data = report
    for op in data["ops"]:
        varying = {key for key in op["constexprs"][0] if len({c[key] for c in op["constexprs"]}) > 1}
        assert varying <= BUCKETED.get(op["kernel"], set()), \
            f"{op['family']} {op['op']}: {op['kernel']} changes {sorted(varying)} with the batch"
        if op["kernel"] in BUCKETED:
            assert op["configs"] <= 3, op


def test_the_count_sees_specialisation():
    """Control: the same kernel without its do_not_specialize compiles a variant per kind of row count
    (1, a multiple of 16, other), so the count above can fail."""
    code = """if True:
        import torch, triton
        from kernels import aot
        from kernels.rms_norm import _rms_norm_kernel, rms_norm_triton
        plain = triton.jit(_rms_norm_kernel.fn)
        keys = {"marked": set(), "plain": set()}
        for rows in (1, 16, 17, 32, 33):
            sink = []
            x, w = torch.empty(rows, 1024, dtype=torch.bfloat16, device="meta"), torch.empty(1024, device="meta")
            with aot.recording(90, sink):
                rms_norm_triton(x, w.to(torch.bfloat16), 1e-6)
            (fn, _, args, kwargs), = sink
            for name, kernel in (("marked", fn), ("plain", plain)):
                _, opts, sig, ce, at = aot.specialize(kernel, args, kwargs, 90)
                keys[name].add(repr((sorted(sig.items()), sorted(ce.items()), sorted(at.items()))))
        print(len(keys["marked"]), len(keys["plain"]))
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "3"], proc.stdout


def test_warm_up_compiles_every_variant_the_batches_launch():
    """kernels/warmup.py's bucketed batches cover every specialisation key that the 40 compositions
    launch, for a Qwen3-0.6B-shaped reranker and a Qwen3.5-0.8B (DeltaNet) one given as config.json."""
    code = """if True:
        import torch
        from kernels import aot, variants, warmup
        qwen3 = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                     intermediate_size=3072)
        qwen3_5 = dict(text_config=dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                        head_dim=256, intermediate_size=3584, linear_num_value_heads=16,
                                        linear_num_key_heads=16, linear_key_head_dim=128,
                                        linear_value_head_dim=128, linear_conv_kernel_dim=4))

        def key(fn, args, kwargs):
            _, opts, sig, ce, at = aot.specialize(fn, args, kwargs, 90)
            return repr((fn.fn.__name__, sorted(sig.items()), sorted(ce.items(), key=repr),
                         sorted(at.items(), key=repr), sorted(opts.__dict__.items(), key=repr)))

        for module, config in (("qwen3", qwen3), ("qwen3_5", qwen3_5)):
            warm = {key(fn, a, k) for fn, _, a, k in warmup.launches(module, config, torch.bfloat16, 90)}
            need = {key(fn, a, k) for fn, _, a, k in
                    warmup.launches(module, config, torch.bfloat16, 90, batches=variants.compositions(40))}
            print(module, len(warm), len(need), len(need - warm))
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == ["qwen3", "qwen3_5"], proc.stdout
    for module, warm, need, missing in rows:
        assert int(need) >= 5, (module, need)
        assert int(missing) == 0, f"{module}: {missing} of {need} variants not compiled by the warm-up"
