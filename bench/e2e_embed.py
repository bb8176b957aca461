"""End-to-end embedding throughput: our engine vs transformers (length-sorted, batch 64), same process.

Qwen3-Embedding with random weights; texts of 32-512 tokens (4,096 on a GPU,
256 by default on CPU with the small CPU shape). Prints tokens/s and the ratio.

    python bench/e2e_embed.py                  # CPU config
    python bench/e2e_embed.py --shape 0.6B     # GPU
"""
import argparse
import random

import torch

from checkpoints import build_qwen3_folder, words
from common import machine, timed, write_json


def reference_embed(tok, model, texts, batch_size):
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = [None] * len(texts)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=8192,
                        return_tensors="pt").to(model.device)
            h = model(**batch).last_hidden_state[:, -1].float()  # left padding: last position
            h = torch.nn.functional.normalize(h, p=2, dim=1).cpu()
            for k, i in enumerate(idx):
                out[i] = h[k]
    return torch.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu", choices=["cpu", "tiny", "0.6B", "4B"])
    ap.add_argument("--texts", type=int, default=None)
    ap.add_argument("--ref-batch", type=int, default=64)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoModel, AutoTokenizer

    from engine import Embedder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = args.texts or (4096 if device == "cuda" else 256)
    rng = random.Random(0)
    # Roughly one token per word with this vocabulary: 32-512 tokens per text.
    texts = [words(rng, rng.randint(31, 511)) for _ in range(n)]
    folder = build_qwen3_folder(args.shape, "Qwen3-Embedding-bench", device, dtype, embed_tokenizer=True)
    print(f"machine: {machine()}  shape: {args.shape}  texts: {n}  dtype: {dtype}")

    emb = Embedder(str(folder), device=device, dtype=dtype)
    tokens = sum(len(x) for x in emb.engine.template.encode(texts).ids)
    emb.embed(texts[:8])
    ours, t = timed(lambda: emb.embed(texts), device)
    res = {"machine": machine(), "shape": args.shape, "texts": n, "tokens": tokens,
           "ours_tokens_per_s": tokens / t}
    print(f"ours: {tokens / t:12.0f} tokens/s  ({t:.2f} s, {tokens} tokens)")
    write_json(args.json, res)
    if not args.skip_reference:
        tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
        model = AutoModel.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        reference_embed(tok, model, texts[:8], args.ref_batch)
        ref, tr = timed(lambda: reference_embed(tok, model, texts, args.ref_batch), device)
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(ours), ref, dim=-1).min().item()
        res.update(ref_tokens_per_s=tokens / tr, ratio=tr / t, min_cosine=cos)
        print(f"transformers (sorted, batch {args.ref_batch}): {tokens / tr:12.0f} tokens/s  ({tr:.2f} s)  "
              f"ratio ours/ref = {tr / t:.2f}x  min cosine = {cos:.6f}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
