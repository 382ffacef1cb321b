"""
The CPU kernel's block sizes (csrc/topk_l2.cpp: key_chunk keys x query_block queries of
inner products per GEMM): each candidate's speed over faiss.IndexFlatL2, timed in pairs
(FAISS, then the kernel) so that the machine's drift hits both alike; the median ratio
of the rounds counts. This is how the kernel's defaults were chosen.

    python -m bench.search_blocks                       # N = 200k, d 256/512/1024, B 64/1024, k = 1024
    python -m bench.search_blocks --d 1024 --B 1024 --blocks 512x512 2048x1024
"""
import argparse
import statistics
import sys

import faiss
import torch

import knnlm
from bench import timed
from knnlm_tools import search

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--N", type=int, default=200_000)
parser.add_argument("--d", type=int, nargs="+", default=[256, 512, 1024])
parser.add_argument("--B", type=int, nargs="+", default=[64, 1024])
parser.add_argument("--k", type=int, default=1024)
parser.add_argument("--blocks", nargs="+", default=["512x512", "2048x1024", "768x256", "768x512", "384x512"],
                    help="KEY_CHUNKxQUERY_BLOCK candidates")
parser.add_argument("--rounds", type=int, default=6)
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
args = parser.parse_args()
if search.knnlm_ext is None:
    sys.exit("knnlm_ext is not built: pip install --no-build-isolation -e .")
torch.set_num_threads(args.threads)
faiss.omp_set_num_threads(args.threads)
blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks]


g = torch.Generator().manual_seed(0)
print(f"N={args.N:,} k={args.k}, {args.threads} threads; kernel speed / FAISS speed, median (min-max) of "
      f"{args.rounds} paired rounds")
for d in args.d:
    keys = torch.randn(args.N, d, generator=g)
    key_norms = knnlm.squared_norms(keys)
    index = faiss.IndexFlatL2(d)
    index.add(keys.numpy())
    for B in args.B:
        queries = torch.randn(B, d, generator=g)
        ratios = {b: [] for b in blocks}
        for _ in range(args.rounds):
            for key_chunk, query_block in blocks:
                faiss_time = timed(lambda: index.search(queries.numpy(), args.k))
                ext_time = timed(lambda: torch.ops.knnlm.topk_l2(queries, keys, args.k, key_norms,
                                                                     key_chunk, query_block))
                ratios[key_chunk, query_block].append(faiss_time / ext_time)
        for (key_chunk, query_block), r in ratios.items():
            print(f"d={d:>4} B={B:>4} keys x queries {key_chunk:>5} x {query_block:<5}: "
                  f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})", flush=True)
