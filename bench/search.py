"""
Exact top-k L2 search on kNN-LM shapes: queries per second of the C++ kernel
(knnlm_ext, csrc/) vs faiss.IndexFlatL2 vs the pure-PyTorch reference, in one
process, on the same threads, interleaved so that all methods see the same machine.

    python -m bench.search --repeats 3     # the full grid, ~45 min on 2 cores
    python -m bench.search --quick         # N = 100k only

Writes bench/results/search.json (one record per shape and method) and
bench/results/search.md (the table the README shows).
"""
import argparse
import os
import platform
import sys

import faiss
import torch

import knnlm
from bench import timed
from knnlm_tools import files, search

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--N", type=int, nargs="+", default=[100_000, 1_000_000])
parser.add_argument("--d", type=int, nargs="+", default=[256, 512, 1024])
parser.add_argument("--B", type=int, nargs="+", default=[64, 1024])
parser.add_argument("--k", type=int, nargs="+", default=[16, 1024])
parser.add_argument("--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
parser.add_argument("--methods", nargs="+", default=["ext", "ext-fp16", "faiss", "torch"],
                    choices=["ext", "ext-fp16", "faiss", "torch"])
parser.add_argument("--repeats", type=int, default=2, help="rounds over the methods; the best time counts")
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
parser.add_argument("--quick", action="store_true", help="N = 100k only")
parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
parser.add_argument("--name", default="search", help="results go to OUT/NAME.json and OUT/NAME.md")
args = parser.parse_args()
if args.quick:
    args.N = [100_000]
if search.knnlm_ext is None:
    sys.exit("knnlm_ext is not built: pip install --no-build-isolation -e .")
torch.set_num_threads(args.threads)
faiss.omp_set_num_threads(args.threads)


def gemm_peak():
    """The machine's float32 GEMM rate in GFLOP/s: the best of a few 4096^3 matmuls. Measured at the
    start and after each group of shapes, and the best counts, as this shared machine's speed drifts."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    out = torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b, out=out)) for _ in range(5))
    return 2 * 4096 ** 3 / best / 1e9


def make_data(kind, N, d, B, g):
    """Keys [N, d] and queries [B, d]. Clustered: 1024 centres of spread 1, points at 0.3 around them,
    queries near the keys, as contexts are near the stored contexts of similar text."""
    if kind == "random":
        return torch.randn(N, d, generator=g), torch.randn(B, d, generator=g)
    centres = torch.randn(1024, d, generator=g)
    keys = centres[torch.randint(1024, (N,), generator=g)]
    keys += 0.3 * torch.randn(N, d, generator=g)
    queries = keys[torch.randint(N, (B,), generator=g)] + 0.3 * torch.randn(B, d, generator=g)
    return keys, queries


peak = gemm_peak()
print(f"{platform.processor() or platform.machine()}, {args.threads} threads: float32 GEMM peak {peak:.0f} GFLOP/s")
records = []
g = torch.Generator().manual_seed(0)
for N in args.N:
    for d in args.d:
        for kind in args.data:
            keys, queries_all = make_data(kind, N, d, max(args.B), g)
            key_norms = knnlm.squared_norms(keys)
            keys16 = keys.half() if "ext-fp16" in args.methods else None
            norms16 = knnlm.squared_norms(keys16) if keys16 is not None else None
            index = None
            if "faiss" in args.methods:
                index = faiss.IndexFlatL2(d)
                index.add(keys.numpy())
            for B in args.B:
                queries = queries_all[:B].contiguous()
                for k in args.k:
                    run = {
                        "ext": lambda: search.topk_l2(queries, keys, k, key_norms, backend="ext"),
                        "ext-fp16": lambda: search.topk_l2(queries, keys16, k, norms16, backend="ext"),
                        "faiss": lambda: index.search(queries.numpy(), k),
                        "torch": lambda: search.topk_l2(queries, keys, k, key_norms, backend="torch"),
                    }
                    best = {m: float("inf") for m in args.methods}
                    for _ in range(args.repeats):
                        for m in args.methods:
                            best[m] = min(best[m], timed(run[m]))
                    # the kernel and FAISS must agree (up to near-ties) for the timing to mean anything
                    ext_ids = run["ext"]()[1]
                    faiss_ids = torch.from_numpy(run["faiss"]()[1]) if index is not None else ext_ids
                    agree = (ext_ids.sort(1)[0] == faiss_ids.sort(1)[0]).float().mean().item()
                    for m in args.methods:
                        records.append({"method": m, "N": N, "d": d, "B": B, "k": k, "data": kind,
                                        "qps": round(B / best[m], 1), "seconds": round(best[m], 4)})
                    line = " | ".join(f"{m} {B / best[m]:8.0f} q/s" for m in args.methods)
                    print(f"N={N:>9,} d={d:>4} B={B:>4} k={k:>4} {kind:>9}: {line} | ext/faiss ids agree {agree:.4f}",
                          flush=True)
            keys = keys16 = index = None  # freed before the next shape's data (the timing lambdas read these names)
            peak = max(peak, gemm_peak())  # the machine's speed drifts: the best rate seen in the run counts
for r in records:
    r["gemm_fraction"] = round(2 * r["B"] * r["N"] * r["d"] / 1e9 / r["seconds"] / peak, 3)


def table(records):
    """One row per shape: q/s of each method, the kernel's speed over FAISS and over PyTorch, % of GEMM peak."""
    methods = args.methods
    head = ["N", "d", "B", "k", "data"] + [f"{m} q/s" for m in methods]
    head += ["ext / faiss", "ext / torch", "% of GEMM peak: " + ", ".join(methods)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shapes = sorted({(r["N"], r["d"], r["B"], r["k"], r["data"]) for r in records})
    for shape in shapes:
        by = {r["method"]: r for r in records if (r["N"], r["d"], r["B"], r["k"], r["data"]) == shape}
        cells = [f"{shape[0]:,}", *map(str, shape[1:])] + [f"{by[m]['qps']:,.0f}" for m in methods]
        cells += [f"{by['ext']['qps'] / by['faiss']['qps']:.2f}x" if "faiss" in by and "ext" in by else "",
                  f"{by['ext']['qps'] / by['torch']['qps']:.2f}x" if "torch" in by and "ext" in by else "",
                  ", ".join(f"{100 * by[m]['gemm_fraction']:.0f}" for m in methods)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


command = " ".join(["python -m bench.search"] + sys.argv[1:])
machine = (f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
           f"faiss {faiss.__version__}, float32 GEMM peak {peak:.0f} GFLOP/s")
os.makedirs(args.out, exist_ok=True)
files.write_json({"machine": machine, "gemm_peak_gflops": round(peak, 1), "command": command,
                      "records": records}, os.path.join(args.out, args.name + ".json"))
with open(os.path.join(args.out, args.name + ".md"), "w") as f:
    f.write(f"`{command}` on {machine}. Best of {args.repeats} interleaved runs.\n\n")
    f.write(table(records) + "\n")
print(table(records))
