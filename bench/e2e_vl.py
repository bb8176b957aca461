"""Qwen3-VL reranker end to end: our engine vs the official code on transformers, same process.

One text query; documents are half images (random pixels, sides 448-1344) and half text.
Ours: ``Reranker.rank`` (preprocessing, the text query's shared prefix, packed batches, the
vision tower over all images of a batch, the yes/no row only). Reference: the official
Qwen3-VL-Reranker code path, one pair at a time as its ``process`` does (its image loading,
transformers' image processor, ``Qwen3VLForConditionalGeneration.model``, the yes - no row).
Prints pairs/s of both, their ratio and the largest score gap.

    python bench/e2e_vl.py                 # CPU: a few layers at small widths, fp32
    python bench/e2e_vl.py --shape 2B      # GPU: the Qwen3-VL-2B shape, bf16

Random weights, the real Qwen vocabulary.
"""
import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from checkpoints import VL_EXTRA_SPECIAL, qwen3_tokenizer, save_qwen_tokenizer, save_random_model, words
from common import machine, timed
from references import Qwen3VLReference

SHAPES = {
    "cpu": dict(text=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, intermediate_size=768, mrope=[12, 10, 10]),
                vision=dict(depth=4, hidden_size=128, num_heads=2, intermediate_size=512,
                            deepstack_visual_indexes=[0, 1, 2])),
    "2B": dict(text=dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128, intermediate_size=6144, mrope=[24, 20, 20]),
               vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                           deepstack_visual_indexes=[5, 11, 17])),
}


def build_folder(shape: str, device: str, dtype: torch.dtype) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text, vision = dict(SHAPES[shape]["text"]), dict(SHAPES[shape]["vision"])
    mrope = text.pop("mrope")
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151669, rms_norm_eps=1e-6, rope_theta=5_000_000.0, initializer_range=0.05,
                         rope_scaling={"rope_type": "default", "mrope_section": mrope, "mrope_interleaved": True},
                         tie_word_embeddings=True, **text),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           out_hidden_size=text["hidden_size"], **vision),
        tie_word_embeddings=True)
    tok = qwen3_tokenizer()
    folder = save_random_model(Qwen3VLForConditionalGeneration, cfg, "Qwen3-VL-Reranker-bench", device, dtype)
    save_qwen_tokenizer(tok, folder, extra_special_tokens=VL_EXTRA_SPECIAL)
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    ap.add_argument("--docs", type=int, default=None, help="documents (default 16 CPU, 128 GPU); half are images")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    from engine import Reranker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n_docs = args.docs or (128 if device == "cuda" else 16)
    rng, rs = random.Random(0), np.random.RandomState(0)
    query = words(rng, 20)
    docs = []
    for i in range(n_docs):
        if i % 2:
            docs.append(words(rng, rng.randint(40, 300)))
        else:
            w, h = rng.randint(448, 1344), rng.randint(448, 1344)
            docs.append({"image": Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8))})
    folder = build_folder(args.shape, device, dtype)
    print(f"machine: {machine()}  shape: {args.shape}  pairs: {n_docs} (half images)  dtype: {dtype}  "
          f"threads: {torch.get_num_threads()}")
    results = {"machine": machine(), "shape": args.shape, "pairs": n_docs, "dtype": str(dtype)}

    rr = Reranker(str(folder), device=device, dtype=dtype)
    rr.rank(query, docs[:2])  # warm-up (and the prefix)
    ranked, t = timed(lambda: rr.rank(query, docs), device)
    ours = {r["index"]: r["score"] for r in ranked}
    results["ours"] = {"pairs_per_s": n_docs / t, "seconds": t}
    print(f"ours:          {n_docs / t:8.2f} pairs/s  ({t:.2f} s)")

    if not args.skip_reference:
        ref = Qwen3VLReference(folder, device=device, dtype=dtype)

        def as_ref(d):
            return (d, []) if isinstance(d, str) else (None, [d["image"]])

        ref.score((query, []), as_ref(docs[1]))  # warm-up
        scores, t = timed(lambda: [ref.score((query, []), as_ref(d)) for d in docs], device)
        diff = max(abs(scores[i] - ours[i]) for i in range(n_docs))
        rate = n_docs / t
        results["transformers"] = {"pairs_per_s": rate, "seconds": t, "max_abs_diff_vs_ours": diff}
        print(f"transformers:  {rate:8.2f} pairs/s  ({t:.2f} s)  ratio ours/ref = "
              f"{results['ours']['pairs_per_s'] / rate:.1f}x  max |score diff| = {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
