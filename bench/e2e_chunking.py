"""Chunked scoring of long documents: documents/s, chunks/s and the work saved by prefix sharing.

Documents of 2k-20k tokens, one query, ``chunking={"tokens": 256, "overlap": 32}`` (MaxP): every
chunk is a pair sharing the query's prompt head. Runs the same workload with prefix sharing on and
off (same process, same weights) and prints pairs/s for both, their ratio, and the share of model
tokens that sharing saved (stats tokens_saved / (tokens_computed + tokens_saved)).

    python bench/e2e_chunking.py                 # CPU: the small Qwen3 reranker, 6 documents
    python bench/e2e_chunking.py --shape 0.6B --docs 64 --device cuda
"""
import argparse
import json
import random

import torch

from checkpoints import build_qwen3_folder, words
from common import machine, timed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--min-words", type=int, default=2000)
    ap.add_argument("--max-words", type=int, default=20000)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    args = ap.parse_args()

    from engine import Reranker

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    folder = build_qwen3_folder(args.shape, "Qwen3-Reranker-bench", args.device, dtype)
    rng = random.Random(0)
    query = words(rng, 40)
    docs = [words(rng, int(w)) for w in torch.linspace(args.min_words, args.max_words, args.docs).tolist()]
    chunking = {"tokens": args.tokens, "overlap": args.overlap}
    out = {"machine": machine(), "shape": args.shape, "docs": args.docs, "words": [args.min_words, args.max_words],
           "chunking": chunking}
    for share in (True, False):
        rr = Reranker(str(folder), device=args.device, share_prefix=share)
        rr.rank(query, docs[:1], chunking=chunking)  # warm-up
        stats: dict = {}
        res, secs = timed(lambda rr=rr: rr.rank(query, docs, chunking=dict(chunking, return_chunks=True),
                                                stats=stats), args.device)
        chunks = sum(len(r["chunks"]) for r in res)
        computed, saved = stats.get("tokens_computed", 0), stats.get("tokens_saved", 0)
        out["shared" if share else "unshared"] = {
            "seconds": round(secs, 3), "chunks": chunks, "docs_per_s": round(len(docs) / secs, 3),
            "pairs_per_s": round(chunks / secs, 2), "tokens_computed": computed, "tokens_saved": saved,
            "saved_share": round(saved / max(1, computed + saved), 4)}
        del rr
    out["speedup_shared_vs_unshared"] = round(out["shared"]["pairs_per_s"] / out["unshared"]["pairs_per_s"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
