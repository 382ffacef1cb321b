"""
Exact vs approximate search (the paper's section 5): validation perplexity with exact
search, with the FAISS IVF-PQ index ranking by quantised distances, and with the index
plus exact re-ranking of what it retrieves (recompute), as more lists are visited
(nprobe). λ and T are those tuned on the exact search; queries/s is the search alone.

The query keys and the exact neighbours come from the cached pass of
experiments/sweeps.py (computed here if missing). Needs the datastore's index:
python build_datastore.py --index.

    python -m experiments.exact_vs_approx --data ../shared/data/wikitext-103-small

-> experiments/results/exact_vs_approx.{json,png}
"""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import knnlm  # noqa: E402
from knnlm_tools import cli  # noqa: E402
from experiments import common  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--nprobes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128],
               help="inverted lists visited per query (default: %(default)s; the paper's is 32)")
p.add_argument("--exact-sample", type=int, default=8192,
               help="queries timed with exact search (its perplexity is the cached pass's) (default: %(default)s)")
args = p.parse_args()
model, vocab, datastore, data_dir = common.load(args)
with cli.user_errors():  # before the (long) pass: is there an index, and is it this datastore's?
    datastore.load_index()
cache = common.cached_pass(args, model, vocab, datastore, data_dir)
lm_ppl = knnlm.perplexity(cache["log_p_lm"])
setting = common.best(cache)
lmbda, T = setting["lambda"], setting["temperature"]
n = len(cache["targets"])


def ppl(part):
    return knnlm.perplexity(knnlm.knnlm_log_probs(part, lmbda, T))


# exact search's speed, timed here beside FAISS's (the cached pass may have run on a busier machine)
sample = cache["queries"][:args.exact_sample]
seconds = common.search_all(datastore, sample, args.k, desc="exact (speed)")[2]  # as common.load set it: exact
numbers = {"split": args.split, "k": args.k, "lambda": lmbda, "temperature": T, "lm_ppl": lm_ppl,
           "exact": {"ppl": ppl(cache), "queries_per_second": len(sample) / seconds}, "faiss": []}
for recompute in (False, True):
    for nprobe in args.nprobes:
        with cli.user_errors():
            datastore.use("faiss", args.device, args.k, nprobe=nprobe, recompute=recompute)
        dists, vals, seconds = common.search_all(datastore, cache["queries"], args.k,
                                                 desc=f"nprobe {nprobe}{', recompute' if recompute else ''}")
        numbers["faiss"].append({"nprobe": nprobe, "recompute": recompute, "queries_per_second": n / seconds,
                                 "ppl": ppl({**cache, "dists": dists, "neighbour_vals": vals})})
        print(numbers["faiss"][-1])
numbers["factory"] = datastore.index.meta["factory"]

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
for recompute, label in ((False, "IVF-PQ, quantised distances"), (True, "IVF-PQ + exact re-ranking")):
    runs = [r for r in numbers["faiss"] if r["recompute"] == recompute]
    ax1.plot([r["nprobe"] for r in runs], [r["ppl"] for r in runs], marker="o", label=label)
    ax2.plot([r["queries_per_second"] for r in runs], [r["ppl"] for r in runs], marker="o", label=label)
for ax in (ax1, ax2):
    ax.axhline(numbers["exact"]["ppl"], color="black", ls=":", label="exact search")
ax1.axhline(lm_ppl, color="gray", ls="--", label="LM alone")
ax2.plot([numbers["exact"]["queries_per_second"]], [numbers["exact"]["ppl"]], "k*", markersize=12)
ax1.set(xscale="log", xlabel="nprobe (lists visited)", ylabel=f"{args.split} perplexity",
        title=f"{numbers['factory']} over {len(datastore):,} keys")
ax1.set_xticks(args.nprobes, [str(p) for p in args.nprobes])
ax2.set(xscale="log", xlabel="search queries / s (2-core CPU)", ylabel=f"{args.split} perplexity",
        title="speed vs perplexity (★ exact)")
ax1.legend(), ax2.legend()
fig.suptitle(f"kNN-LM on {common.corpus_name(args)} {args.split}: k = {args.k}, λ = {lmbda}, T = {T}")
common.save(args, "exact_vs_approx", numbers, fig)
