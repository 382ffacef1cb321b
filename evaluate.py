"""
Evaluate kNN-LM: perplexity of the LM alone and of kNN-LM (eq. 3) on a split,
from one pass that computes p_LM and the k nearest neighbours of every token.

    python evaluate.py --k 1024 --lambda 0.25          # the paper's setting
    python evaluate.py --tune --results results/wikitext-103-small.json

--tune picks λ and the temperature on the validation split (one pass, then cheap
re-mixing of the cached p_LM and neighbours) and evaluates --split with them.
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
from knnlm_tools import files, corpora, checkpoints, datastores, cli

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=[cli.arguments("data", "checkpoint", "window", "datastore", "k", "lambda",
                                                              "temperature", "nprobe", "min_context", "batch_size",
                                                              "device")])
parser.add_argument("--split", default="test", choices=knnlm.SPLITS, help="split to evaluate (default: %(default)s)")
cli.backend_argument(parser)
parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                    help="faiss: re-rank the retrieved neighbours by exact distances from the float16 keys "
                         "(default: on, as in the paper)")
parser.add_argument("--tune", action="store_true",
                    help="choose λ and temperature on the valid split, then evaluate --split with them")
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
cli.check_knnlm_arguments(parser, args)

start = time.time()
outputs = ExitStack()  # the results file: checked, and locked against a second writer, before any work
with cli.user_errors(interrupted="nothing was written; rerun the same command"):
    if args.results:
        outputs.enter_context(files.writing(args.results))
        earlier = files.read_json(args.results, {}) if os.path.isfile(args.results) else {}
    model, vocab, ckpt = checkpoints.load_model(args.checkpoint, cli.check_device(args.device), args.window)
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
searched_by = (f"FAISS {datastore.index.meta['factory']}, nprobe {datastore.index.nprobe}, recompute "
          f"{'on' if args.recompute else 'off'}" if backend == "faiss" else f"exact ({backend})")
print(f"datastore {args.datastore}: {len(datastore):,} keys ({datastore.key_type}), search: {searched_by}; "
      f"model {args.checkpoint}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


def score(split):
    return knnlm.score_split(model, tokens[split], datastore, args.k, min_context, args.batch_size, desc=split)


def lower(ppl, lm_ppl):
    return f"{100 * (1 - ppl / lm_ppl):.1f}% lower" if math.isfinite(ppl) and math.isfinite(lm_ppl) else "infinite"


caches = {}
with cli.user_errors(interrupted="nothing was written; rerun the same command"):
    if args.tune or args.results:
        caches["valid"] = score("valid")
    if args.tune:
        args.lmbda, args.temperature, ppl, _ = knnlm.tune(caches["valid"], knnlm.LAMBDAS, knnlm.TEMPERATURES)
        print(f"tuned on valid: λ = {args.lmbda}, temperature = {args.temperature} (valid kNN-LM ppl {ppl:.2f})")
    for split in splits:
        if split not in caches:
            caches[split] = score(split)

lm_ppl, knnlm_ppl = {}, {}
for split, cache in caches.items():
    lm_ppl[split] = knnlm.perplexity(cache["log_p_lm"])
    knnlm_ppl[split] = knnlm.perplexity(knnlm.knnlm_log_probs(cache, args.lmbda, args.temperature))
    print(f"{split}: {len(cache['targets']):,} tokens | LM ppl {lm_ppl[split]:.2f} | kNN-LM ppl {knnlm_ppl[split]:.2f} "
          f"({lower(knnlm_ppl[split], lm_ppl[split])}) at k={args.k}, λ={args.lmbda}, "
          f"T={args.temperature}; search {len(cache['targets']) / cache['search_seconds']:,.0f} queries/s")
    if knnlm_ppl[split] == float("inf"):
        print(f"{split}: the kNN-LM perplexity is infinite: at λ = {args.lmbda} some token got probability 0 "
              "(λ = 1 and none of its neighbours carries it)")

if args.results:
    setting = datastores.measured_with(ckpt["fingerprint"], datastore, args.k, args.lmbda, args.temperature,
                                      min_context, args.max_tokens)
    results = {"lm_ppl": lm_ppl, "knnlm_ppl": knnlm_ppl, "k": args.k, "lambda": args.lmbda,
               "temperature": args.temperature, "datastore_size": len(datastore), "backend": backend,
               "tuned_on_valid": args.tune, "vocab_size": len(vocab), "model": ckpt["config"],
               "key_type": datastore.key_type, "min_context": min_context, "measured_with": setting,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {args.device}",
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
