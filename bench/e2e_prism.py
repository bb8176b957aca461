"""Prism-Reranker (Qwen3.5) end to end: our engine vs transformers, same process.

1. Scoring: pairs/s over one query and its documents (ours: packed batches,
   shared prefix, yes/no row only; transformers: length-sorted left-padded
   batches with logits at the last position only), and the largest score gap.
2. Evidence: greedy decoding of ``--gen-docs`` relevant documents, batched
   (ours: KV cache + DeltaNet states behind the shared prefix; transformers:
   ``generate`` on the left-padded batch). Both are forced to ``--new-tokens``
   tokens (a random model never says ``<|im_end|>`` on cue). Prints tokens/s.
3. Evidence requests: ``rank(return_evidence=True)`` over ``--evidence-docs`` documents with the
   threshold at their median score (half are decoded, ``--new-tokens`` each), before (scored, then
   the chosen documents prefilled again) and after (scored and decoded from one prefill): model
   tokens (every row the model computed: prefix, prompts, decode) and pairs/s.

Random weights, the real Qwen3.5 vocabulary (248,320 rows), the Prism prompt.

    python bench/e2e_prism.py                  # CPU: small config (hidden 256, 4 layers), fp32
    python bench/e2e_prism.py --shape 0.8B     # GPU: the Qwen3.5-0.8B shape, bf16

On a shared CPU, ``--threads 1`` gives steadier ratios than torch's default threads.
"""
import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import torch

from checkpoints import qwen3_5_tokenizer, save_qwen_tokenizer, words
from common import machine, timed

# Qwen3.5 text shapes: three Gated DeltaNet layers per gated full-attention layer.
SHAPES = {
    "cpu": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=64, linear_value_head_dim=64),
    "0.8B": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                 linear_key_head_dim=128, linear_value_head_dim=128),
}


def build_folder(shape: str, device: str, dtype: torch.dtype) -> Path:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    folder = Path(tempfile.mkdtemp(prefix="bench-")) / "Prism-Reranker-bench"
    cfg = Qwen3_5TextConfig(vocab_size=248320, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.05,
                            max_position_embeddings=32768, pad_token_id=248044, eos_token_id=248046,
                            rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                             "partial_rotary_factor": 0.25},
                            **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3_5ForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    save_qwen_tokenizer(qwen3_5_tokenizer(), folder)
    return folder


def reference_scores(model, tokenizer, prompts, batch_size, yes, no):
    """Length-sorted, left-padded batches; logits at the last position only."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [0.0] * len(prompts)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = batch.to(model.device)
            logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
            for i, v in zip(idx, torch.sigmoid(logits[:, yes] - logits[:, no]).tolist()):
                out[i] = v
    return out


def reference_generate(model, tokenizer, prompts, new_tokens):
    with torch.inference_mode():
        batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(model.device)
        out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    ap.add_argument("--docs", type=int, default=None, help="documents to score (default 64 CPU, 1024 GPU)")
    ap.add_argument("--gen-docs", type=int, default=32, help="relevant documents to decode")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per document (default 32 CPU, 256 GPU)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="evidence decode from this many caller threads at once, each with its own query "
                         "and --gen-docs / N documents (ours only)")
    ap.add_argument("--evidence-docs", type=int, default=None,
                    help="documents per evidence request (default 16 CPU, 256 GPU)")
    ap.add_argument("--evidence-reps", type=int, default=3, help="evidence requests timed per path (best kept)")
    ap.add_argument("--skip-evidence-requests", action="store_true")
    ap.add_argument("--ref-batch", type=int, default=None, help="transformers batch size (default 8 CPU, 32 GPU)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from engine import Reranker
    from engine.core.evidence import Generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gpu = device == "cuda"
    n_docs = args.docs or (1024 if gpu else 64)
    new_tokens = args.new_tokens or (256 if gpu else 32)
    rng = random.Random(0)
    query = words(rng, 20)
    lo, hi = (64, 448) if gpu else (40, 300)
    docs = [words(rng, rng.randint(lo, hi)) for _ in range(n_docs)]
    folder = build_folder(args.shape, device, dtype)
    print(f"machine: {machine()}  shape: {args.shape}  pairs: {n_docs}  dtype: {dtype}  "
          f"threads: {torch.get_num_threads()}")
    results = {"machine": machine(), "shape": args.shape, "pairs": n_docs, "dtype": str(dtype)}

    rr = Reranker(str(folder), device=device, dtype=dtype)
    rr.predict([(query, d) for d in docs[:4]])  # warm-up (and the prefix)
    rr.stats.clear()
    scores, t = timed(lambda: rr.predict([(query, d) for d in docs]), device)
    results["ours_scoring"] = {"pairs_per_s": n_docs / t, "seconds": t}
    print(f"ours scoring:          {n_docs / t:9.1f} pairs/s  ({t:.2f} s)")

    tpl, gen = rr.engine.template, Generator(rr.engine)
    head = tpl.encode_head(query)
    gen_docs = docs[: args.gen_docs]
    tails = tpl.encode_tails(head, gen_docs).ids
    gen.generate(tails[:2], head, max_new_tokens=2, stop_ids=[])  # warm-up
    seqs, t = timed(lambda: gen.generate(tails, head, max_new_tokens=new_tokens, stop_ids=[]), device)
    n_tok = sum(len(s) for s in seqs)
    results["ours_generate"] = {"tokens_per_s": n_tok / t, "seconds": t, "docs": len(tails), "tokens": n_tok}
    print(f"ours evidence decode:  {n_tok / t:9.1f} tokens/s ({len(tails)} docs x {new_tokens} tokens, {t:.2f} s)")

    if args.concurrency > 1:
        per = max(1, args.gen_docs // args.concurrency)
        jobs = []
        for _ in range(args.concurrency):
            h = tpl.encode_head(words(rng, 20))
            jobs.append((h, tpl.encode_tails(h, docs[:per]).ids))
        for h, tl in jobs:  # warm the prefixes: the timed part is prefill + decode
            gen.generate(tl[:1], h, max_new_tokens=1, stop_ids=[])
        outs = [None] * len(jobs)
        start = threading.Barrier(len(jobs) + 1)

        def work(i):
            start.wait()
            outs[i] = gen.generate(jobs[i][1], jobs[i][0], max_new_tokens=new_tokens, stop_ids=[])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for th in threads:
            th.start()
        t0 = time.perf_counter()
        start.wait()
        for th in threads:
            th.join()
        t = time.perf_counter() - t0
        n_tok = sum(len(s) for o in outs for s in o)
        results["ours_generate_concurrent"] = {"tokens_per_s": n_tok / t, "seconds": t, "callers": len(jobs),
                                               "docs_per_caller": per, "tokens": n_tok}
        print(f"ours evidence decode, {len(jobs)} concurrent callers x {per} docs: {n_tok / t:9.1f} tokens/s "
              f"({t:.2f} s)")

    if not args.skip_evidence_requests:
        ev_docs = docs[: args.evidence_docs or (256 if gpu else 16)]
        ev_scores = sorted(scores[: len(ev_docs)])
        threshold = float(ev_scores[len(ev_scores) // 2])
        vocab = rr.engine.tokenizer.get_vocab()
        stops = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]

        def evidence(one_prefill: bool, n: int):
            rr._evidence_one_prefill = one_prefill
            if rr._generator is None:
                rr._generator = Generator(rr.engine)
            rr._generator.stop_ids = []  # every decoded document writes --new-tokens tokens
            stats = {}
            out = rr.rank(query, ev_docs[:n], return_evidence=True, evidence_threshold=threshold,
                          max_new_tokens=new_tokens, stats=stats)
            return out, stats

        for one in (False, True):
            evidence(one, 2)  # warm-up
        runs, best = {}, {}
        for _ in range(args.evidence_reps):  # alternating, best of each: a shared machine's noise hits both
            for label, one in (("before", False), ("after", True)):
                (out, stats), t = timed(lambda: evidence(one, len(ev_docs)), device)
                runs[label] = out
                if label not in best or t < best[label][0]:
                    best[label] = (t, stats)
        for label, (t, stats) in best.items():
            results[f"evidence_requests_{label}"] = {
                "pairs_per_s": len(ev_docs) / t, "seconds": t, "model_tokens": stats["tokens_computed"],
                "decoded": stats["evidence_decoded"], "generated_tokens": stats["evidence_tokens"]}
            print(f"evidence requests {label:6s} {len(ev_docs) / t:9.1f} pairs/s  ({t:.2f} s best of "
                  f"{args.evidence_reps}, {stats['tokens_computed']} model tokens, {stats['evidence_decoded']} of "
                  f"{len(ev_docs)} decoded)")
        rr._generator.stop_ids = stops
        same = [(r["index"], r["raw_output"]) for r in runs["before"]] == \
            [(r["index"], r["raw_output"]) for r in runs["after"]]
        b, a = results["evidence_requests_before"], results["evidence_requests_after"]
        results["evidence_requests_same_output"] = same
        print(f"evidence requests after/before: {a['pairs_per_s'] / b['pairs_per_s']:.2f}x pairs/s, "
              f"{a['model_tokens'] / b['model_tokens']:.2f}x model tokens, same outputs: {same}")

    if not args.skip_reference:
        from transformers import Qwen3_5ForCausalLM

        tok = rr.engine.tokenizer
        tok.padding_side = "left"
        model = Qwen3_5ForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        prompts = tpl.encode([query] * n_docs, docs).ids
        yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        bs = args.ref_batch or (32 if gpu else 8)
        reference_scores(model, tok, prompts[:4], bs, yes, no)  # warm-up
        ref, t = timed(lambda: reference_scores(model, tok, prompts, bs, yes, no), device)
        diff = max(abs(a - b) for a, b in zip(ref, scores))
        rate = n_docs / t
        results["transformers_scoring"] = {"pairs_per_s": rate, "seconds": t, "max_abs_diff_vs_ours": diff}
        print(f"transformers scoring:  {rate:9.1f} pairs/s  ({t:.2f} s)  ratio ours/ref = "
              f"{results['ours_scoring']['pairs_per_s'] / rate:.1f}x  max |score diff| = {diff:.2e}")
        whole = [head + tl for tl in tails]
        reference_generate(model, tok, whole[:2], 2)  # warm-up
        ref_tok, t = timed(lambda: reference_generate(model, tok, whole, new_tokens), device)
        rate = ref_tok / t
        results["transformers_generate"] = {"tokens_per_s": rate, "seconds": t, "tokens": ref_tok}
        print(f"transformers generate: {rate:9.1f} tokens/s ({t:.2f} s)  ratio ours/ref = "
              f"{results['ours_generate']['tokens_per_s'] / rate:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
