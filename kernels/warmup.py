"""Compile, at model load, every Triton variant a model's batches will launch.

No kernel argument that follows the batch is specialised (``do_not_specialize``, and tile
sizes picked by widths alone; ``python -m kernels.variants`` checks it), so the variants of
a model are fixed by its shapes, its dtype, the op modes (prefix, state, decode) and the
few tile buckets that the batch does pick: the delta-rule chunk (16 / 32 / 64 by the
longest sequence). One batch per bucket therefore compiles them all.

How: the host wrappers run on ``meta`` tensors at the model's shapes for each bucket
(``kernels.aot``'s op lists, the launches the engine's model files make), each launch is
recorded, and ``JITFunction.run(..., warmup=True)`` compiles it into the JIT's cache of the
current CUDA device without launching anything. A real request then finds its binary.

    warm_up("qwen3", config_dict, torch.bfloat16, torch.device("cuda"))
"""
import logging
import time

log = logging.getLogger("engine")

# One batch per tile bucket: the delta-rule chunks 64 (> 32 tokens), 32 (17-32) and 16 (decode,
# prompts <= 16 tokens); the other kernels compile the same variant for all three.
BUCKETS = ([5, 64, 200], [7, 19, 32], [1, 1, 1])


def _text(cfg: dict) -> dict:
    """The text decoder's part of a config (``text_config`` of multimodal checkpoints)."""
    nested = cfg.get("text_config")
    return nested if isinstance(nested, dict) else cfg


def _decoder_dims(c: dict) -> dict:
    heads = c["num_attention_heads"]
    return dict(hidden=c["hidden_size"], heads=heads, kv_heads=c.get("num_key_value_heads", heads),
                head_dim=c.get("head_dim") or c["hidden_size"] // heads, inter=c["intermediate_size"])


def families(module: str, config: dict):
    """[(op list of kernels.aot, its shape dict)] for a model of ``engine.models.<module>``; [] where
    none is known (that model's kernels then compile at their first batch, as before)."""
    from kernels import aot

    if module in ("qwen3", "qwen3_vl"):
        out = [(aot.qwen3_ops, _decoder_dims(_text(config)))]
        vision = config.get("vision_config")
        if module == "qwen3_vl" and isinstance(vision, dict):
            out.append((aot.qwen3_vl_vision_ops, dict(hidden=vision["hidden_size"], heads=vision["num_heads"])))
        return out
    if module == "bert":
        return [(aot.bert_ops, dict(hidden=config["hidden_size"], heads=config["num_attention_heads"]))]
    if module == "qwen3_5":
        c = _text(config)
        dims = _decoder_dims(c)
        dims.update(v_heads=c["linear_num_value_heads"], k_heads=c["linear_num_key_heads"],
                    k_dim=c["linear_key_head_dim"], v_dim=c["linear_value_head_dim"],
                    conv=c.get("linear_conv_kernel_dim", 4))
        return [(aot.qwen3_5_ops, dims)]
    return []


def launches(module: str, config: dict, dtype, arch: int, batches=BUCKETS):
    """The recorded launches (fn, grid, args, kwargs) of every op of the model over ``batches``,
    with the config pickers answering for a CUDA device of capability ``arch``."""
    from kernels import aot
    from kernels.attention import USE_DESC_DEFAULT

    out = []
    for ops, dims in families(module, config):
        for lens in batches:
            for op, thunk in ops(dims, list(lens), dtype):
                if "TMA" in op and not USE_DESC_DEFAULT:  # tensor-descriptor attention: opt-in (ENGINE_ATTN_TMA=1)
                    continue
                sink = []
                with aot.recording(arch, sink):
                    thunk()
                out.extend(sink)
    return out


def warm_up(module: str, config: dict, dtype, device) -> dict:
    """Compile the model's variants on CUDA ``device`` (nothing elsewhere, or under the interpreter,
    or without Triton). Returns {"launches", "seconds"}; a failure is logged, never raised: the
    kernels then compile on first use, as without a warm-up."""
    import torch

    from ._dispatch import interpreted
    from ._utils import HAS_TRITON

    if not HAS_TRITON or interpreted() or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return dict(launches=0, seconds=0.0)
    t0 = time.time()
    n = 0
    try:
        with torch.cuda.device(device):
            major, minor = torch.cuda.get_device_capability(device)
            for fn, grid, args, kwargs in launches(module, config, dtype, major * 10 + minor):
                fn.run(*args, grid=grid, warmup=True, **kwargs)
                n += 1
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop a model from loading
        log.warning("kernel warm-up stopped after %d launches (%s: %s); the rest compile on first use",
                    n, type(exc).__name__, exc)
    seconds = time.time() - t0
    log.info("kernel warm-up: %d launches compiled or found in %.1fs", n, seconds)
    return dict(launches=n, seconds=seconds)


__all__ = ["BUCKETS", "families", "launches", "warm_up"]
