"""Shared bench helpers: model shapes, random-weight checkpoints, workloads, timing."""
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Qwen3 shapes (DESIGN.md 2.1); "cpu" is the small CPU benchmark model of DESIGN.md 4.
QWEN3_SHAPES = {
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, intermediate_size=768, tie_word_embeddings=True),
    "0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728, tie_word_embeddings=True),
}

from textgen import WORDS, random_text as words  # noqa: E402,F401 (tests/ is on the path above)


def build_qwen3_folder(shape: str, name: str, device: str, dtype: torch.dtype, embed_tokenizer: bool = False) -> Path:
    """A random-weight Qwen3 checkpoint with the real Qwen vocabulary, saved as safetensors."""
    from qwen_vocab import build_qwen3_backend, save_qwen3_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="bench-")) / name
    cfg = Qwen3Config(vocab_size=151669, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      pad_token_id=151643, eos_token_id=151645, initializer_range=0.05, **QWEN3_SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    save_qwen3_tokenizer(build_qwen3_backend(), folder, eos_suffix=embed_tokenizer)
    return folder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def latency_ms(fn, device: str, reps: int) -> dict:
    """p50 / p99 / mean milliseconds of ``fn(rep)`` over ``reps`` calls (after one warm-up call)."""
    fn(-1)
    times = []
    for rep in range(reps):
        times.append(timed(lambda: fn(rep), device)[1] * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "mean_ms": sum(times) / len(times), "reps": reps}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
