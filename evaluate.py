"""
Evaluate kNN-LM: perplexity of the LM alone and of kNN-LM (eq. 3) on a split,
from one pass that computes p_LM and the k nearest neighbours of every token.

    python evaluate.py --k 1024 --lambda 0.25          # the paper's setting
    python evaluate.py --tune --results results/wikitext-103-small.json

--tune picks λ and the temperature on the validation split (one pass, then cheap
re-mixing of the cached p_LM and neighbours) and evaluates --split with them.

--cache adds the continuous cache (knnlm.py, section 7) and prints the paper's Table 1:
LM, LM + cache, kNN-LM, kNN-LM + cache; with --tune its θ and weight are tuned on valid
too: θ and λ_c for LM + cache, then for kNN-LM + cache λ_c, λ and T jointly at that θ.

    python evaluate.py --tune --cache --results results/wikitext-103-small.json
"""
import argparse
import math
import os
import platform
import sys
import time
from contextlib import ExitStack

import torch

import knnlm
from knnlm_tools import files, corpora, checkpoints, datastores, cli, cpu

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                 parents=[cli.arguments("data", "checkpoint", "window", "datastore", "k", "lambda",
                                                              "temperature", "nprobe", "min_context", "batch_size",
                                                              "device", "precision")])
parser.add_argument("--split", default="test", choices=knnlm.SPLITS, help="split to evaluate (default: %(default)s)")
cli.backend_argument(parser)
parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                    help="faiss: re-rank the retrieved neighbours by exact distances from the float16 keys "
                         "(default: on, as in the paper)")
parser.add_argument("--tune", action="store_true",
                    help="choose λ and temperature on the valid split, then evaluate --split with them")
parser.add_argument("--cache", action="store_true",
                    help="also the continuous cache of the paper's Table 1 (Grave et al., 2017): LM + cache and "
                         "kNN-LM + cache")
parser.add_argument("--cache-window", type=cli.positive_int, default=knnlm.CACHE_WINDOW,
                    help="--cache: the previous positions it holds (default: %(default)s)")
parser.add_argument("--cache-theta", type=cli.finite_float(0, low_open=True), default=None,
                    help="--cache: θ of p_cache ∝ exp(θ h_t · h_i) (tuned on valid by --tune; else needed)")
parser.add_argument("--cache-lambda", type=cli.finite_float(0, 1), default=None,
                    help="--cache: its weight λ_c, p = λ_c p_cache + (1 - λ_c) p_LM (tuned on valid by --tune; "
                         "else needed)")
parser.add_argument("--max-tokens", type=cli.positive_int, default=None,
                    help="score only the first N tokens of each split (default: all of them)")
parser.add_argument("--results", default=None, help="also write valid and test perplexities to this JSON file")
parser.add_argument("--verify", action="store_true",
                    help="first check every byte of the datastore (and its index) against the checksums of its "
                         "manifest; without it only sizes and sampled checksums are checked")
parser.add_argument("--allow-eval-split-datastore", action="store_true",
                    help="evaluate a split the datastore was built from (refused by default: every token "
                         "finds itself among its neighbours, and the perplexity means nothing)")
args = parser.parse_args()
cpu.reuse_freed_memory()  # the big blocks of one step kept for the next: no page faults
cli.check_knnlm_arguments(parser, args)
if args.cache and not args.tune and (args.cache_theta is None or args.cache_lambda is None):
    parser.error("--cache needs --cache-theta and --cache-lambda, or --tune to choose them on valid")

start = time.time()
outputs = ExitStack()  # the results file: checked, and locked against a second writer, before any work
with cli.user_errors(interrupted="nothing was written; rerun the same command"):
    if args.results:
        outputs.enter_context(files.writing(args.results))
        earlier = files.read_json(args.results, {}) if os.path.isfile(args.results) else {}
        if os.path.isfile(args.results) and "lm_ppl" not in earlier:  # e.g. a datastore's meta.json, overwritten
            raise knnlm.KnnlmError(f"{args.results} is not a results file of evaluate.py (it has no lm_ppl): "
                                   "pass another --results")
    model, vocab, ckpt = checkpoints.load_model(args.checkpoint, cli.check_device(args.device), args.window)
    threads = cpu.Threads().follow(model)
    precision = cpu.resolve_precision(args.precision, args.device)
    datastore = datastores.DiskDatastore(args.datastore)
    datastore.check_model(model, vocab, args.checkpoint)
    if args.verify:
        datastore.verify()
    backend = datastore.use(args.backend, args.device, args.k, args.nprobe, args.recompute)
    data_dir = corpora.resolve_corpus(args.data)
    min_context = knnlm.resolve_min_context(args.min_context, model.cfg.block_size)
    splits = list(dict.fromkeys((["valid"] if args.tune or args.results else []) + [args.split]
                                + (["test"] if args.results else [])))
    paths = {split: knnlm.split_path(data_dir, split) for split in splits}
    if not args.allow_eval_split_datastore:
        corpora.check_not_built_from(datastore, paths.values())
    tokens = {}
    for split, path in paths.items():  # every split read and checked before the long passes
        tokens[split] = corpora.check_has_words(vocab.encode_file(path), path, "evaluate")[
            :None if args.max_tokens is None else args.max_tokens + 1]
        if args.cache and len(tokens[split]) - 1 < args.cache_window:
            raise knnlm.KnnlmError(f"--cache-window {args.cache_window} is more than the {len(tokens[split]) - 1:,} "
                                   f"tokens scored of {split}: the cache would never fill (it holds every earlier "
                                   "token of the text until it has the window's); pass a smaller --cache-window")
searched_by = (f"FAISS {datastore.index.meta['factory']}, nprobe {datastore.index.nprobe}, recompute "
          f"{'on' if args.recompute else 'off'}" if backend == "faiss" else f"exact ({backend})")
print(f"datastore {args.datastore}: {len(datastore):,} keys ({datastore.key_type}), search: {searched_by}; "
      f"model {args.checkpoint}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {precision}; "
      f"{threads}")


def note_grid_edge(name, value, grid, grid_name):
    """A value tuned at either end of its grid: the best may lie beyond it, which the grid cannot tell."""
    if value in (min(grid), max(grid)):
        print(f"note: {name} = {value} is at the end of the grid tuned over ({grid_name}: {min(grid)} to "
              f"{max(grid)}); the best may lie beyond it")


def score(split):
    with cpu.autocast(precision, args.device):
        return knnlm.score_split(model, tokens[split], datastore, args.k, min_context, args.batch_size, desc=split,
                                 keep_queries=args.cache)


def lower(ppl, lm_ppl):
    if not (math.isfinite(ppl) and math.isfinite(lm_ppl)):
        return "infinite"
    change = 100 * (1 - ppl / lm_ppl)
    return f"{change:.1f}% lower" if change >= 0 else f"{-change:.1f}% higher"


caches = {}
known_cache = {}  # valid's log p_cache at the tuned θ, computed by the tuning: reused for its Table 1
known_knn = {}    # valid's log p_kNN at every T, computed by the tuning: reused for its numbers
with cli.user_errors(interrupted="nothing was written; rerun the same command"):
    if args.tune or args.results:
        caches["valid"] = score("valid")
    if args.tune:  # p_kNN at every T once, for both grid searches with kNN-LM
        grid = knnlm.knn_grid(caches["valid"], knnlm.TEMPERATURES)
        known_knn["valid"] = dict(zip(knnlm.TEMPERATURES, grid))
        args.lmbda, args.temperature, ppl, _ = knnlm.tune(caches["valid"], knnlm.LAMBDAS, knnlm.TEMPERATURES, grid=grid)
        print(f"tuned on valid: λ = {args.lmbda}, temperature = {args.temperature} (valid kNN-LM ppl {ppl:.2f})")
        if args.lmbda:  # at λ = 0 the temperature plays no part
            note_grid_edge("temperature", args.temperature, knnlm.TEMPERATURES, "knnlm.TEMPERATURES")
    if args.cache and args.tune:
        log_p_caches = knnlm.cache_grid(caches["valid"], knnlm.CACHE_THETAS, args.cache_window)
        args.cache_theta, args.cache_lambda, _, _, ppl = knnlm.tune_cache(caches["valid"], args.cache_window,
                                                                          log_p_caches=log_p_caches)
        print(f"tuned on valid: cache θ = {args.cache_theta}, λ_c = {args.cache_lambda} (valid LM + cache ppl {ppl:.2f})")
        if args.cache_lambda:
            note_grid_edge("cache θ", args.cache_theta, knnlm.CACHE_THETAS, "knnlm.CACHE_THETAS")
        known_cache["valid"] = log_p_caches[knnlm.CACHE_THETAS.index(args.cache_theta)]
        *with_knnlm, ppl = knnlm.tune_cache(caches["valid"], args.cache_window, thetas=[args.cache_theta],
                                           lambdas=knnlm.LAMBDAS, temperatures=knnlm.TEMPERATURES, grid=grid,
                                           log_p_caches=known_cache["valid"][None])
        print("tuned on valid, with kNN-LM: θ = {}, λ_c = {}, λ = {}, T = {} (valid kNN-LM + cache ppl {:.2f})".format(
            *with_knnlm, ppl))
        if with_knnlm[2]:
            note_grid_edge("temperature with the cache", with_knnlm[3], knnlm.TEMPERATURES, "knnlm.TEMPERATURES")
    elif args.cache:
        with_knnlm = [args.cache_theta, args.cache_lambda, args.lmbda, args.temperature]
    for split in splits:
        if split not in caches:
            caches[split] = score(split)

lm_ppl, knnlm_ppl, cache_ppl, knnlm_cache_ppl = {}, {}, {}, {}
for split, cache in caches.items():
    lm_ppl[split] = knnlm.perplexity(cache["log_p_lm"])
    knn_by_T = known_knn.get(split, {})  # log p_kNN at each T the tuning computed (valid only)
    knnlm_ppl[split] = knnlm.perplexity(knnlm.knnlm_log_probs(cache, args.lmbda, args.temperature,
                                                              log_p_knn=knn_by_T.get(args.temperature)))
    print(f"{split}: {len(cache['targets']):,} tokens | LM ppl {lm_ppl[split]:.2f} | kNN-LM ppl {knnlm_ppl[split]:.2f} "
          f"({lower(knnlm_ppl[split], lm_ppl[split])}) at k={args.k}, λ={args.lmbda}, "
          f"T={args.temperature}; search {len(cache['targets']) / cache['search_seconds']:,.0f} queries/s")
    if args.cache:  # the paper's Table 1; both rows with the cache at one θ
        theta, lambda_cache, lmbda, T = with_knnlm
        log_p_cache = known_cache.get(split)
        if log_p_cache is None:
            log_p_cache = knnlm.cache_grid(cache, [theta], args.cache_window)[0]
        cache_ppl[split] = knnlm.perplexity(knnlm.cache_log_probs(cache, theta, args.cache_lambda, args.cache_window,
                                                                  log_p_cache=log_p_cache))
        knnlm_cache_ppl[split] = knnlm.perplexity(knnlm.cache_log_probs(cache, theta, lambda_cache, args.cache_window,
                                                                        lmbda, T, args.k, log_p_cache=log_p_cache,
                                                                        log_p_knn=knn_by_T.get(T)))
        print(f"{split}: Table 1 | LM {lm_ppl[split]:.2f} | + cache {cache_ppl[split]:.2f} | kNN-LM {knnlm_ppl[split]:.2f} "
              f"| kNN-LM + cache {knnlm_cache_ppl[split]:.2f} (cache of {args.cache_window} positions)")
    if knnlm_ppl[split] == float("inf"):
        print(f"{split}: the kNN-LM perplexity is infinite: at λ = {args.lmbda} some token got probability 0 "
              "(λ = 1 and none of its neighbours carries it)")

if args.results:
    trained = checkpoints.training_args(ckpt) or {}  # train.py's arguments (none for a converted model)
    setting = datastores.measured_with(ckpt["fingerprint"], datastore, args.k, args.lmbda, args.temperature,
                                      min_context, args.max_tokens, precision)
    results = {"lm_ppl": lm_ppl, "knnlm_ppl": knnlm_ppl, "k": args.k, "lambda": args.lmbda,
               "temperature": args.temperature, "datastore_size": len(datastore), "backend": backend,
               "search": searched_by, "precision": {"evaluation": precision, "datastore": datastore.meta.precision,
                                                    "training": trained.get("precision")},
               "mkl": {"evaluation": cpu.mkl_path(), "training": trained.get("mkl")},
               "tuned_on_valid": args.tune, "vocab_size": len(vocab), "model": ckpt["config"],
               "key_type": datastore.key_type, "min_context": min_context, "measured_with": setting,
               **({"cache_ppl": cache_ppl, "knnlm_cache_ppl": knnlm_cache_ppl,
                   "cache": {"window": args.cache_window, "key": datastore.key_type, "theta": args.cache_theta,
                             "lambda": args.cache_lambda, "with_knnlm": dict(zip(
                                 ("theta", "lambda_cache", "lambda", "temperature"), with_knnlm))}}
                  if args.cache else {}),
               "machine": f"{platform.machine()}, {threads}, {args.device}",
               "seconds": round(time.time() - start), "command": "python " + " ".join(sys.argv)}
    backends = earlier.get("backends")  # bench.index's search backends, kept only beside the numbers they belong to
    if isinstance(backends, dict) and backends.get("measured_with") == setting:
        results["backends"] = backends
    elif backends is not None:
        print(f"dropped the 'backends' table of {args.results}: it was measured with another model, datastore or "
              "settings (python -m bench.index measures it again)")
    with cli.user_errors():
        files.write_json(results, args.results)
    print(f"wrote {args.results}")
outputs.close()
