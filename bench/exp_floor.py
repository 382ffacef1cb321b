"""
The tuning's exps, floored: on the CPU, exp of a float32 below about -87.3 (a result below
float32's smallest normal number) takes a slow path. knnlm.knn_log_prob_grid and
knnlm.cache_log_prob raise every exponent to knnlm.EXP_FLOOR first. This measures, in one process,
on the first --tokens tokens of valid (one LM pass and one FAISS search with the main job's model
and datastore), each pair in turn (A B A B):

1. p_kNN at the tuning's 12 temperatures: knn_log_prob at each (two logsumexps, exercise 4), and
   knn_log_prob_grid with one exp per neighbour, without the floor (EXP_FLOOR = -inf, where the
   clamp does nothing) and with it;
2. p_cache at the tuning's 11 θs: cache_log_prob without the floor and with it;

and what the floor changes: the tuned values, and the largest relative difference of the
perplexities over each tuning grid (λ < 1).

    python -m bench.exp_floor --data ../shared/data/wikitext-103-small

Writes bench/results/exp_floor.json and exp_floor.md.
"""
import argparse
import math
import sys
import time

import torch

import knnlm
from bench import write_results
from knnlm_tools import checkpoints, corpora, cpu, datastores


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def floored(on, fn):
    """fn() with knnlm.EXP_FLOOR as it is (on) or -inf (off: clamp_(min=-inf) changes nothing)."""
    kept = knnlm.EXP_FLOOR
    knnlm.EXP_FLOOR = kept if on else -math.inf
    try:
        return fn()
    finally:
        knnlm.EXP_FLOOR = kept


def worst_ppl_difference(log_p_lm, a, b, lambdas):
    """The largest relative difference of the perplexities of a's and b's rows mixed with p_LM at each λ < 1."""
    return max(abs(knnlm.perplexity(knnlm.interpolate(log_p_lm, x, lmbda))
                   / knnlm.perplexity(knnlm.interpolate(log_p_lm, y, lmbda)) - 1)
               for x, y in zip(a, b) for lmbda in lambdas if lmbda < 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/wikitext-103-small")
    parser.add_argument("--checkpoint", default="runs/model.pt")
    parser.add_argument("--datastore", default="runs/datastore", help="with its index (build_datastore.py --index)")
    parser.add_argument("--tokens", type=int, default=50_000, help="valid tokens scored")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cpu.reuse_freed_memory()
    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    datastore = datastores.DiskDatastore(args.datastore)
    datastore.check_model(model, vocab)
    datastore.use("faiss", "cpu", 1024, recompute=True)
    valid = vocab.encode_file(knnlm.split_path(corpora.resolve_corpus(args.data), "valid"))[:args.tokens + 1]
    cache = knnlm.score_split(model, valid, datastore, 1024, keep_queries=True, desc="valid")
    dists, vals, targets = knnlm.nearest_k(cache)
    Ts, thetas = knnlm.TEMPERATURES, knnlm.CACHE_THETAS
    runs = {
        "p_kNN: knn_log_prob at each T": lambda: torch.stack([knnlm.knn_log_prob(dists, vals, targets, T) for T in Ts]),
        "p_kNN: knn_log_prob_grid, no floor": lambda: floored(False, lambda: knnlm.knn_log_prob_grid(
            dists, vals, targets, Ts)),
        "p_kNN: knn_log_prob_grid, floored": lambda: knnlm.knn_log_prob_grid(dists, vals, targets, Ts),
        "p_cache: cache_log_prob, no floor": lambda: floored(False, lambda: knnlm.cache_grid(cache, thetas)),
        "p_cache: cache_log_prob, floored": lambda: knnlm.cache_grid(cache, thetas),
    }
    seconds, out = {name: [] for name in runs}, {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            out[name], s = timed(fn)
            seconds[name].append(round(s, 2))
            print(f"{name}: {s:.2f} s", flush=True)
    best = {name: min(s) for name, s in seconds.items()}
    knn_before, knn_after = out["p_kNN: knn_log_prob at each T"], out["p_kNN: knn_log_prob_grid, floored"]
    cache_before, cache_after = out["p_cache: cache_log_prob, no floor"], out["p_cache: cache_log_prob, floored"]
    tuned = {name: {"kNN-LM (λ, T)": knnlm.tune(cache, knnlm.LAMBDAS, Ts, grid=knn)[:2],
                    "LM + cache (θ, λ_c)": knnlm.tune_cache(cache, log_p_caches=caches)[:2]}
             for name, knn, caches in (("before", knn_before, cache_before), ("floored", knn_after, cache_after))}
    record = {
        "command": "python -m bench.exp_floor " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
        "machine": cpu.describe(), "tokens": len(targets), "seconds": seconds, "best": best,
        "speedup": {"p_kNN, one exp and floored vs knn_log_prob at each T":
                    best["p_kNN: knn_log_prob at each T"] / best["p_kNN: knn_log_prob_grid, floored"],
                    "p_kNN, the floor alone": best["p_kNN: knn_log_prob_grid, no floor"]
                    / best["p_kNN: knn_log_prob_grid, floored"],
                    "p_cache, the floor": best["p_cache: cache_log_prob, no floor"]
                    / best["p_cache: cache_log_prob, floored"]},
        "tuned": tuned,
        "worst_ppl_difference": {
            "kNN-LM": worst_ppl_difference(cache["log_p_lm"], knn_before, knn_after, knnlm.LAMBDAS),
            "LM + cache": worst_ppl_difference(cache["log_p_lm"], cache_before, cache_after, knnlm.CACHE_LAMBDAS)},
    }
    lines = [f"`{record['command']}` on {record['machine']}, {record['date']}.", "",
             f"The first {record['tokens']:,} valid tokens, k = 1024; seconds of each run, in turn:", "",
             "| computation | seconds | best |", "|---|---|---|"]
    lines += [f"| {name} | {', '.join(map(str, s))} | {best[name]:.2f} |" for name, s in seconds.items()]
    lines += [""] + [f"- {name}: {x:.2f}x" for name, x in record["speedup"].items()]
    lines += ["", f"Tuned before: {tuned['before']}; floored: {tuned['floored']}. Largest relative difference of "
                  f"a perplexity over the grids (λ < 1): kNN-LM {record['worst_ppl_difference']['kNN-LM']:.1e}, "
                  f"LM + cache {record['worst_ppl_difference']['LM + cache']:.1e}."]
    write_results("exp_floor", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
