#!/usr/bin/env python
"""Count the compiled variants of every Triton kernel over many batch compositions, on CPUs only.

A Triton JIT launch compiles one binary per *specialisation key*: the constexprs, the
launch options (warps, stages) and, for every argument, its type and attributes. An int
argument becomes an i32 or i64, a compile-time 1 when it equals 1, and carries a
"divisible by 16" attribute when it is a multiple of 16; a pointer carries the same
attribute for its address. So a batch-dependent int (rows, tokens, sequences) that is
left specialisable makes up to three binaries of one tile configuration as batch sizes
change, and each lands as a compile in whichever request first meets it.

Method (the machinery of kernels/aot.py, no GPU): the real host wrappers run on ``meta``
tensors at each composition's shapes with the config pickers told the device is CUDA;
``JITFunction.run`` records each launch instead of running it; each launch goes through
the binder of Triton's JIT (``kernels.aot.specialize``), which computes the same
signature, constexprs and attributes as ``JITFunction.run`` does before its cache
lookup, honouring ``do_not_specialize``. Two launches share a compiled binary exactly
when these, with the options, agree.

A kernel's *tile configuration* is its constexprs and launch options; the rest of the key
(argument types and attributes) must not depend on the batch. The report gives, per
kernel, the number of distinct keys and of distinct tile configurations (equal when the
batch adds no variant), and per (family, op) the configurations that the batch picks.

    python -m kernels.variants                 # table; exit 1 when a batch adds a variant
    python -m kernels.variants --json out.json
"""
import argparse
import json
import os
import random
import sys

# The shapes of kernels/aot.py's families that the engine serves most (one per model kind).
FAMILIES = ("Qwen3-0.6B", "Qwen3.5-0.8B", "T5Gemma2-270M", "MiniLM-L6", "Qwen3-VL-2B-vision")


def compositions(count: int = 40, seed: int = 0):
    """``count`` batches (lists of sequence lengths) over the sizes a server sees: 1 to 100 sequences,
    lengths 1 to 1,000 (decode steps, short queries, documents), multiples of 16 and odd sizes alike."""
    rng = random.Random(seed)
    out = [[1], [16], [1] * 16, [1] * 17]  # edge cases: one token, 16 tokens, 16 and 17 one-token rows
    while len(out) < count:
        n = rng.choice([1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 48, 64, 100])
        longest = rng.choice([1, 8, 16, 31, 32, 33, 64, 200, 512, 1000])
        out.append([rng.randint(1, longest) for _ in range(n)])
    return out


def _split(fn, signature, constexprs, attrs, options):
    """(tile configuration, rest of the key, {argument: its specialisation}) of one launch."""
    names = fn.arg_names

    def name_of(path):
        return names[path[0]] if len(path) == 1 else f"{names[path[0]]}{list(path[1:])}"

    declared = {path: v for path, v in constexprs.items() if fn.params[path[0]].is_constexpr}
    config = (tuple(sorted((name_of(p), repr(v)) for p, v in declared.items())),
              tuple(sorted((k, repr(v)) for k, v in options.__dict__.items())))
    per_arg = {name: str(ty) for name, ty in signature.items() if not fn.params[names.index(name)].is_constexpr}
    for path, value in constexprs.items():  # an int equal to 1 (or None) becomes a constexpr of the JIT
        if path not in declared:
            per_arg[name_of(path)] = f"constexpr {value!r}"
    for path, value in attrs.items():  # "tt.divisibility" 16 of ints and pointers
        per_arg[name_of(path)] = f"{per_arg.get(name_of(path), '')} {value}".strip()
    return config, tuple(sorted(per_arg.items())), per_arg


def count_variants(families=FAMILIES, batches=None, arch: int = 90, dtype: str = "bfloat16"):
    """{"kernels": {kernel: {...}}, "ops": [...]} over ``batches`` (default :func:`compositions`)."""
    import torch

    from kernels import aot

    batches = compositions() if batches is None else batches
    kernels, ops = {}, {}
    for table, make_ops in aot.FAMILIES:
        for family, cfg in table.items():
            if family not in families:
                continue
            for lens in batches:
                for op, thunk in make_ops(cfg, lens, getattr(torch, dtype)):
                    sink = []
                    with aot.recording(arch, sink):
                        thunk()
                    for fn, _grid, args, kwargs in sink:
                        _, options, signature, constexprs, attrs = aot.specialize(fn, args, kwargs, arch)
                        config, rest, per_arg = _split(fn, signature, constexprs, attrs, options)
                        name = fn.fn.__name__
                        k = kernels.setdefault(name, dict(keys=set(), configs={}))
                        k["keys"].add((config, rest))
                        k["configs"].setdefault(config, {}).setdefault(rest, (family, op, len(lens), sum(lens),
                                                                              per_arg))
                        ops.setdefault((family, op, name), set()).add(config)
    report = dict(arch=arch, dtype=dtype, families=list(families), batches=len(batches), kernels={}, ops=[])
    for name, k in sorted(kernels.items()):
        extra = []
        for config, rests in k["configs"].items():
            if len(rests) > 1:  # the batch changed an argument's specialisation within one tile configuration
                examples = list(rests.values())
                base = examples[0][4]
                for fam, op, n, t, per_arg in examples[1:]:
                    diff = {a: (base.get(a), v) for a, v in per_arg.items() if base.get(a) != v}
                    extra.append(f"{fam} {op} (n={n}, T={t}): " + ", ".join(f"{a}: {b} -> {v}"
                                                                           for a, (b, v) in sorted(diff.items())))
        report["kernels"][name] = dict(variants=len(k["keys"]), configs=len(k["configs"]), batch_added=extra)
    for (family, op, name), configs in sorted(ops.items()):
        report["ops"].append(dict(family=family, op=op, kernel=name, configs=len(configs),
                                  constexprs=[dict(c[0]) for c in sorted(configs)]))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, choices=(90, 80))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--count", type=int, default=40, help="batch compositions (default 40)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernels.variants reads the JIT's specialisation: run it with TRITON_INTERPRET unset")
    report = count_variants(batches=compositions(args.count), arch=args.arch, dtype=args.dtype)
    print(f"{'kernel':<28} {'variants':>8} {'configs':>8}")
    for name, k in report["kernels"].items():
        print(f"{name:<28} {k['variants']:>8} {k['configs']:>8}")
        for line in k["batch_added"][:6]:
            print("    batch-added:", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if any(k["batch_added"] for k in report["kernels"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
