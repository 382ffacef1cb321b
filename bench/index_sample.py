"""
The index's training sample: how many keys its lists (FAISS's k-means) and codebooks are trained on,
against the time its build takes and the kNN-LM perplexity it gives. For each size and seed the index
of the main job's datastore is built as `build_datastore.py --index --train-size N` builds it, test is
searched with it (at each of --nprobes, by default evaluate.py's 32; --candidates N: N found, the k nearest
kept) and re-ranked as `evaluate.py --backend faiss` searches, and kNN-LM's test perplexity
at (λ, T) is compared with exact search's, computed once in the same process. Seed s draws the sample
and is added to the seed of FAISS's k-means (faiss_index.train_index), so that an index of every key
varies too; seed 0 is the index build_datastore.py builds.

    python -m bench.index_sample --data ../shared/data/wikitext-103-small

Writes bench/results/index_sample.json and index_sample.md (--out NAME: NAME.json and NAME.md). Needs the
datastore's own index (run.sh builds it); the others are written beside it, under names of their own, and
removed after.
"""
import argparse
import os
import sys
import time

import knnlm
from bench import timed, write_results
from experiments import common
from knnlm_tools import checkpoints, corpora, cpu, datastores, faiss_index, search


def test_ppl(cache, datastore, k, lmbda, temperature, candidates):
    """kNN-LM's perplexity of the scored test cache with the k nearest of the `candidates` neighbours the datastore
    finds as its use() decided, and the search's seconds."""
    dists, vals, seconds = common.search_all(datastore, cache["queries"], candidates, desc="test")
    dists, vals = dists[:, :k], vals[:, :k]
    return knnlm.perplexity(knnlm.knnlm_log_probs({**cache, "dists": dists, "neighbour_vals": vals}, lmbda,
                                                  temperature)), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/wikitext-103-small")
    parser.add_argument("--checkpoint", default="runs/model.pt")
    parser.add_argument("--datastore", default="runs/datastore")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 262_144, 131_072],
                        help="keys to train on (0: build_datastore.py's default, every key up to 256 a list)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nprobes", type=int, nargs="+", default=[32],
                        help="lists visited: each index searched at each")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--candidates", type=int, default=None,
                        help="the indexes' neighbours found and re-ranked, of which the k nearest count (default: k)")
    parser.add_argument("--lambda", dest="lmbda", type=float, default=0.25, help="the main job's, tuned on valid")
    parser.add_argument("--temperature", type=float, default=8.0, help="the main job's, tuned on valid")
    parser.add_argument("--out", default="index_sample", help="results file name under bench/results/")
    args = parser.parse_args()
    candidates = args.candidates or args.k
    cpu.reuse_freed_memory()
    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    datastore = datastores.DiskDatastore(args.datastore)
    datastore.check_model(model, vocab)
    test = vocab.encode_file(knnlm.split_path(corpora.resolve_corpus(args.data), "test"))
    with cpu.autocast(cpu.resolve_precision("auto", "cpu"), "cpu"):  # as evaluate.py's LM pass (the machine says which)
        cache = knnlm.score_split(model, test, None, keep_queries=True, desc="test")
    exact_backend = "ext" if search.kernel_built() else "torch"
    datastore.use(exact_backend, "cpu", args.k)
    exact, exact_seconds = test_ppl(cache, datastore, args.k, args.lmbda, args.temperature, args.k)
    print(f"exact ({exact_backend}): test kNN-LM {exact:.5f} in {exact_seconds:.0f} s", flush=True)
    datastore.use("faiss", "cpu", args.k)  # then each index in turn (load_index)
    rows = []
    for size in args.sizes:
        for seed in args.seeds:
            name = f"bench_index_sample_{size}_{seed}"
            plan = {}
            built = timed(lambda: plan.update(faiss_index.build_index(datastore, train_size=size or None, seed=seed,
                                                                      name=name, progress=False)))
            for nprobe in args.nprobes:
                datastore.load_index(nprobe, name=name)
                ppl, seconds = test_ppl(cache, datastore, args.k, args.lmbda, args.temperature, candidates)
                rows.append({"train_size": plan["train_size"], "seed": seed, "nprobe": nprobe, "build_seconds": built,
                             "search_seconds": seconds, "test_knnlm_ppl": ppl, "vs_exact": ppl / exact - 1})
                print(rows[-1], flush=True)
            for part in ("faiss", "json"):
                os.remove(faiss_index.index_path(datastore, name, part))
    record = {"command": "python -m bench.index_sample " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": cpu.describe(), "factory": plan["factory"], "keys": len(datastore),
              "test_tokens": len(test) - 1, "k": args.k, "candidates": candidates, "lambda": args.lmbda,
              "temperature": args.temperature, "exact_backend": exact_backend,
              "exact_test_knnlm_ppl": exact, "exact_search_seconds": exact_seconds, "indexes": rows}
    among = f" (the nearest of {candidates:,} found)" if candidates != args.k else ""
    lines = [f"`{record['command']}` on {record['machine']}, {record['date']}.", "",
             f"{record['factory']} of {len(datastore):,} keys, trained on a sample of them; test ({len(test) - 1:,} "
             f"tokens) searched with k = {args.k}{among}, re-ranked, and kNN-LM at λ = {args.lmbda}, "
             f"T = {args.temperature}, against exact search ({exact_backend}): {exact:.5f}.", "",
             "| keys trained on | seed | index built | nprobe | search | test kNN-LM | vs exact |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['train_size']:,} | {r['seed']} | {r['build_seconds']:.1f} s | {r['nprobe']} | "
              f"{r['search_seconds']:.1f} s | {r['test_knnlm_ppl']:.5f} | {100 * r['vs_exact']:+.3f}% |" for r in rows]
    write_results(args.out, record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
