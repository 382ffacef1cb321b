"""
The re-ranking's sort: rerank_l2 (csrc/rerank_l2.cpp) computes the exact distances of the k ids
FAISS found for a query, then sorts the k (distance, id) candidates, each one 64-bit integer
(csrc/candidate.h). It sorted them with std::sort; sort_candidates, a radix sort, does from 256
candidates on. This measures both on the candidates of real queries, in one process, each pair
in turn (A B A B): the main job's model scores the first --tokens tokens of valid, FAISS finds
1024 ids per token as evaluate.py --backend faiss does, rerank_l2 gives their distances, and
each sort then orders every query's candidates in the order FAISS returned them, on one thread.
Both must give rerank_l2's own order (the candidates are distinct integers); the whole rerank_l2 call
(every thread) is timed too, for the share of it that sorting is.

    python -m bench.rerank_sort --data ../shared/data/wikitext-103-small

Writes bench/results/rerank_sort.json and rerank_sort.md. The sorts are compiled from
csrc/candidate.h with the C++ compiler into a small library, called through ctypes.
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import knnlm
from bench import write_results
from knnlm_tools import checkpoints, corpora, cpu, datastores

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
HARNESS = r"""
#include <chrono>
#include "candidate.h"
extern "C" void encode(const float* dists, const int64_t* ids, uint64_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = candidate(dists[i], ids[i] < 0 ? 0xffffffffu : ids[i]);
}
extern "C" double sort_rows(uint64_t* c, int64_t rows, int64_t k, int radix) {  // -> seconds
  std::vector<uint64_t> spare;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < rows; ++r) {
    if (radix) sort_candidates(c + r * k, k, spare); else std::sort(c + r * k, c + (r + 1) * k);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
"""


def harness():
    """The two sorts of csrc/candidate.h, compiled with -O3 as setup.py compiles the kernel."""
    folder = tempfile.mkdtemp(prefix="rerank_sort")
    source, library = os.path.join(folder, "harness.cpp"), os.path.join(folder, "harness.so")
    with open(source, "w") as f:
        f.write(HARNESS)
    subprocess.run([os.environ.get("CXX", "c++"), "-O3", "-g0", "-shared", "-fPIC", "-I", CSRC, source,
                    "-o", library], check=True)
    lib = ctypes.CDLL(library)
    lib.encode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.sort_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.sort_rows.restype = ctypes.c_double
    return lib


def in_faiss_order(dists, ids, faiss_ids):
    """rerank_l2's sorted (dists, ids) put back in the order FAISS returned the ids."""
    back = torch.empty_like(dists)
    back.scatter_(1, faiss_ids.argsort(dim=1, stable=True), dists.gather(1, ids.argsort(dim=1, stable=True)))
    return back


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/wikitext-103-small")
    parser.add_argument("--checkpoint", default="runs/model.pt")
    parser.add_argument("--datastore", default="runs/datastore", help="with its index (build_datastore.py --index)")
    parser.add_argument("--tokens", type=int, default=20_000, help="valid tokens whose neighbours are sorted")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu.reuse_freed_memory()
    lib = harness()
    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    datastore = datastores.DiskDatastore(args.datastore)
    datastore.check_model(model, vocab)
    datastore.use("faiss", "cpu", 1024, recompute=False)  # FAISS's ids in its own order, not re-ranked
    valid = vocab.encode_file(knnlm.split_path(corpora.resolve_corpus(args.data), "valid"))[:args.tokens + 1]
    queries = knnlm.score_split(model, valid, None, keep_queries=True, desc="valid")["queries"]
    faiss_ids = datastore.search(queries, 1024)[1]
    rerank = lambda: torch.ops.knnlm.rerank_l2(queries, datastore.keys, faiss_ids, -1, 0)
    dists, ids = rerank()
    rows, k = faiss_ids.shape
    unsorted = np.empty((rows, k), np.uint64)
    d, i = in_faiss_order(dists, ids, faiss_ids).contiguous().numpy(), faiss_ids.contiguous().numpy()
    lib.encode(d.ctypes.data, i.ctypes.data, unsorted.ctypes.data, unsorted.size)
    kernels = np.empty_like(unsorted)  # rerank_l2's own order, to check the harness against
    lib.encode(dists.contiguous().numpy().ctypes.data, ids.contiguous().numpy().ctypes.data, kernels.ctypes.data,
               kernels.size)
    seconds, out = {"std::sort": [], "sort_candidates": [], f"rerank_l2 ({torch.get_num_threads()} threads)": []}, {}
    for _ in range(args.repeats):
        for radix, name in ((0, "std::sort"), (1, "sort_candidates")):
            out[name] = unsorted.copy()
            seconds[name].append(lib.sort_rows(out[name].ctypes.data, rows, k, radix))
        start = time.perf_counter()
        rerank()
        seconds[f"rerank_l2 ({torch.get_num_threads()} threads)"].append(time.perf_counter() - start)
    same = bool(np.array_equal(out["std::sort"], out["sort_candidates"]) and np.array_equal(out["std::sort"], kernels))
    best = {name: min(s) for name, s in seconds.items()}
    record = {"command": "python -m bench.rerank_sort " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": cpu.describe(), "queries": rows, "k": k, "seconds": seconds, "best": best,
              "speedup": best["std::sort"] / best["sort_candidates"], "same_order": same}
    lines = [f"`{record['command']}` on {record['machine']}, {record['date']}.", "",
             f"{rows:,} valid tokens' {k} neighbours from FAISS, sorted on one thread; seconds of each run, "
             "in turn (the sorts' own clock):", "", "| computation | seconds | best | µs a query |", "|---|---|---|---|"]
    lines += [f"| {name} | {', '.join(f'{x:.3f}' for x in s)} | {best[name]:.3f} | {1e6 * best[name] / rows:.1f} |"
              for name, s in seconds.items()]
    lines += ["", f"sort_candidates {record['speedup']:.2f}x faster than std::sort, the same order: {same}."]
    write_results("rerank_sort", record, "\n".join(lines) + "\n")
    if not same:
        raise SystemExit("the two sorts disagree")


if __name__ == "__main__":
    main()
