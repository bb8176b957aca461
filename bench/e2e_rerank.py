"""End-to-end rerank throughput: our engine vs the model card's transformers code, same process.

Workload "rerank-1k" (one query, 1,000 documents of 64-448 tokens) on a GPU shape; on the CPU default, the small
Qwen3 reranker (hidden 256, 4 layers, real vocabulary) with 256 documents of
40-300 words and a 40-word query. Prints pairs/s for both and the ratio.

    python bench/e2e_rerank.py                 # CPU config
    python bench/e2e_rerank.py --shape 0.6B    # GPU, random weights at the real shape
    python bench/e2e_rerank.py --compile both --latency-docs 100   # eager vs torch.compile, p50 latency

``--latency-docs N``: the p50/p99 of one request of N documents (a new query each
time, so the prefix cache does not help), ours and the model card's one padded
batch: the latency figures of bench/RESULTS.md's GPU table.
"""
import argparse
import random
import time

import torch

from checkpoints import build_qwen3_folder, words
from common import latency_ms, machine, timed, write_json
from references import Qwen3RerankerReference


def make_workload(args, rng):
    if args.shape == "cpu":
        query = words(rng, 40)
        docs = [words(rng, rng.randint(40, 300)) for _ in range(args.docs or 256)]
    else:  # rerank-1k: ~64-token shared prefix (template + query), documents of 64-448 tokens
        query = words(rng, 20)
        docs = [words(rng, rng.randint(64, 448)) for _ in range(args.docs or 1024)]
    return query, docs


def reference_scores(ref, pairs, batch_size, last_only):
    """Model-card code; ``last_only`` is its sorted variant with logits at the last position only."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][1])) if last_only else list(range(len(pairs)))
    out = [0.0] * len(pairs)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            inputs = ref.encode([pairs[i] for i in idx])
            batch = ref.tokenizer.pad(inputs, padding=True, return_tensors="pt").to(ref.model.device)
            kw = {"logits_to_keep": 1} if last_only else {}
            logits = ref.model(**batch, **kw).logits[:, -1, :].float()
            two = torch.stack([logits[:, ref.no], logits[:, ref.yes]], dim=1)
            for i, v in zip(idx, torch.log_softmax(two, dim=1)[:, 1].exp().tolist()):
                out[i] = v
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu", choices=["cpu", "tiny", "0.6B", "4B"])
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--ref-batch", type=int, default=None, help="transformers batch size (default 8 CPU, 32 GPU)")
    ap.add_argument("--max-batch-tokens", type=int, nargs="*", default=[None], help="token budgets to sweep")
    ap.add_argument("--share-prefix", choices=["on", "off", "both"], default="on",
                    help="compute the shared query prefix once per request (on), per pair (off), or both")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off",
                    help="run our engine eager (off), through torch.compile (on), or both")
    ap.add_argument("--latency-docs", type=int, default=0, help="also time one request of N documents (p50/p99)")
    ap.add_argument("--latency-reps", type=int, default=None, help="requests timed (default 20 GPU, 5 CPU)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--cpu-precisions", action="store_true",
                    help="CPU: also run ours in bf16 and with int8 linears; speed, max |score diff| and top-10 "
                         "overlap against our fp32")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    from engine import Reranker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rng = random.Random(0)
    query, docs = make_workload(args, rng)
    pairs = [(query, d) for d in docs]
    folder = build_qwen3_folder(args.shape, "Qwen3-Reranker-bench", device, dtype)
    print(f"machine: {machine()}  shape: {args.shape}  pairs: {len(pairs)}  dtype: {dtype}")

    results = {"machine": machine(), "shape": args.shape, "pairs": len(pairs), "ours": {}}
    ours_scores = None
    shares = {"on": [True], "off": [False], "both": [True, False]}[args.share_prefix]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    reps = args.latency_reps or (20 if device == "cuda" else 5)
    lat_docs = docs[: args.latency_docs]
    eager_scores = None
    for compile_ in compiles:
        for share in shares:
            for budget in args.max_batch_tokens:
                t0 = time.perf_counter()
                rr = Reranker(str(folder), device=device, dtype=dtype, max_batch_tokens=budget, share_prefix=share,
                              compile=compile_)
                for n in (8, 64):  # warm-up (a compiled forward compiles here, for dynamic shapes)
                    rr.predict(pairs[:n])
                warm = time.perf_counter() - t0
                rr.engine.prefix_cache.__init__(rr.engine.prefix_cache.max_bytes)  # cold: the query is new
                rr.stats.clear()
                ours_scores, t = timed(lambda: rr.predict(pairs), device)
                if compile_ and eager_scores is not None:  # compile=True must score as eager
                    results["compile_max_abs_diff_vs_eager"] = max(abs(a - b) for a, b in zip(ours_scores, eager_scores))
                    print(f"compile vs eager: max |score diff| = {results['compile_max_abs_diff_vs_eager']:.2e}")
                elif not compile_:
                    eager_scores = ours_scores
                key = (f"share_prefix={'on' if share else 'off'} max_batch_tokens={rr.engine.max_batch_tokens}"
                       + (" compile" if compile_ else ""))
                s = rr.stats
                row = results["ours"][key] = {"pairs_per_s": len(pairs) / t, "seconds": t, "load_warmup_s": warm,
                                              "stats": dict(s)}
                print(f"ours ({key}): {len(pairs) / t:9.1f} pairs/s  ({t:.2f} s; tokens computed "
                      f"{s['tokens_computed']}, saved {s['tokens_saved']}, batches {s['batches']}, forward "
                      f"{s['forward_s']:.2f} s, tokenize {s['tokenize_s']:.2f} s; load + warm-up {warm:.1f} s)")
                if lat_docs:
                    row["latency"] = latency_ms(
                        lambda rep: rr.predict([(f"{rep} {query}", d) for d in lat_docs]), device, reps)
                    print(f"  one request of {len(lat_docs)} documents: p50 {row['latency']['p50_ms']:.1f} ms, "
                          f"p99 {row['latency']['p99_ms']:.1f} ms")
                write_json(args.json, results)
                del rr

    if args.cpu_precisions and device == "cpu":
        base = max(v["pairs_per_s"] for v in results["ours"].values())
        top = set(sorted(range(len(pairs)), key=lambda i: -eager_scores[i])[:10])
        for name, kw in (("bf16", {"dtype": "bfloat16"}), ("int8", {"quantize": "int8"})):
            rr = Reranker(str(folder), device=device, max_batch_tokens=args.max_batch_tokens[0], **kw)
            rr.predict(pairs[:64])
            rr.engine.prefix_cache.__init__(rr.engine.prefix_cache.max_bytes)
            scores, t = timed(lambda: rr.predict(pairs), device)
            diff = max(abs(a - b) for a, b in zip(scores, eager_scores))
            overlap = len(top & set(sorted(range(len(pairs)), key=lambda i: -scores[i])[:10]))
            results[f"ours {name}"] = {"pairs_per_s": len(pairs) / t, "x_fp32": len(pairs) / t / base,
                                       "max_abs_score_diff_vs_fp32": diff, "top10_overlap": overlap}
            print(f"ours {name}: {len(pairs) / t:9.1f} pairs/s  ({len(pairs) / t / base:.2f}x our fp32)  "
                  f"max |score diff| vs fp32 {diff:.2e}  top-10 overlap {overlap}/10")
            write_json(args.json, results)
            del rr

    if not args.skip_reference:
        ref = Qwen3RerankerReference(folder)
        ref.model.to(device=device, dtype=dtype)
        bs = args.ref_batch or (32 if device == "cuda" else 8)
        best = max(v["pairs_per_s"] for v in results["ours"].values())
        for name, last_only in (("transformers, model-card code", False), ("transformers, sorted + last token only", True)):
            reference_scores(ref, pairs[:4], bs, last_only)  # warm-up
            ref_scores, t = timed(lambda: reference_scores(ref, pairs, bs, last_only), device)
            rate = len(pairs) / t
            diff = max(abs(a - b) for a, b in zip(ref_scores, ours_scores))
            results[name] = {"pairs_per_s": rate, "seconds": t, "max_abs_diff_vs_ours": diff}
            print(f"{name}: {rate:9.1f} pairs/s  ({t:.2f} s)  ratio ours/ref = {best / rate:.1f}x  "
                  f"max |score diff| = {diff:.2e}")
            if lat_docs:  # the model card's one padded batch of all the documents
                lat = latency_ms(lambda rep: reference_scores(ref, [(f"{rep} {query}", d) for d in lat_docs],
                                                              len(lat_docs), last_only), device, reps)
                results[name]["latency"] = lat
                print(f"  one request of {len(lat_docs)} documents: p50 {lat['p50_ms']:.1f} ms, "
                      f"p99 {lat['p99_ms']:.1f} ms")
            write_json(args.json, results)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
