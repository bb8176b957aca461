"""Zero-shot classification quality and throughput on a labelled JSONL file (BTZSC format).

Each line is {"text": ..., "label": ...}. Labels come from --labels (a JSON
{name: description} mapping, or a list of names); by default the label names
found in the data are their own descriptions. Prints macro F1, accuracy,
texts/s and tokens computed vs saved by prefix sharing.

    python bench/zero_shot.py                             # bundled all-MiniLM-L6-v2 on bench/data
    python bench/zero_shot.py --model Qwen/Qwen3-Reranker-0.6B --data my.jsonl --labels labels.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def macro_f1(gold, pred, labels):
    f1s = []
    for c in labels:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or hub id (default: bundled all-MiniLM-L6-v2)")
    ap.add_argument("--data", default=str(HERE / "data" / "zero_shot_topics.jsonl"))
    ap.add_argument("--labels", default=None, help="JSON file: {name: description} or [names]")
    ap.add_argument("--instruction", default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    from engine import Classifier
    from engine.core.runner import pick_device

    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    texts, gold = [r["text"] for r in rows], [r["label"] for r in rows]
    if args.labels:
        labels = json.load(open(args.labels, encoding="utf-8"))
    else:
        default = Path(args.data).with_suffix(".labels.json")
        labels = json.load(open(default)) if default.is_file() else sorted(set(gold))
    names = list(labels)
    clf = Classifier(args.model, device=args.device)
    clf.classify(texts[:2], labels)  # warm-up
    stats = {}
    t0 = time.perf_counter()
    out = clf.classify(texts, labels, instruction=args.instruction, stats=stats)
    dt = time.perf_counter() - t0
    pred = [o["label"] for o in out]
    acc = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    print(f"device: {pick_device(args.device)}  model: {args.model or 'all-MiniLM-L6-v2 (bundled)'}  "
          f"texts: {len(texts)}  labels: {len(names)}")
    print(f"macro F1: {macro_f1(gold, pred, names):.3f}  accuracy: {acc:.3f}  "
          f"{len(texts) / dt:.1f} texts/s  tokens computed: {stats.get('tokens_computed', 0)}  "
          f"saved by prefix sharing: {stats.get('tokens_saved', 0)}")


if __name__ == "__main__":
    main()
