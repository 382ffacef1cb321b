"""
Datastore size (the paper's Figures 2 and 3): validation perplexity, and the best λ,
as the datastore grows through fractions of the training split (its first 1/32, 1/16,
..., all of it: the datastore's first rows are the first tokens of the text).

The query keys and p_LM come from the cached pass of experiments/sweeps.py (computed
here if missing); each smaller datastore is searched exactly with the same queries.

    python -m experiments.datastore_size --data ../shared/data/wikitext-103-small

-> experiments/results/datastore_size.{json,png}
"""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import knnlm  # noqa: E402
from experiments import common  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--fractions", type=float, nargs="+", default=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1],
               help="parts of the datastore, each its first rows (default: 1/32 ... 1)")
args = p.parse_args()
if not all(0 < f <= 1 for f in args.fractions):
    p.error(f"--fractions must be in (0, 1], got {args.fractions}")
model, vocab, datastore, data_dir = common.load(args)
cache = common.cached_pass(args, model, vocab, datastore, data_dir)
lm_ppl = knnlm.perplexity(cache["log_p_lm"])

sizes = []
for fraction in sorted(args.fractions):
    n = round(fraction * len(datastore))
    if n < args.k:
        print(f"skipping {fraction:.4g} of the datastore: {n:,} keys < k = {args.k}")
        continue
    part = common.first_rows(args, cache, datastore, n, args.split)
    sizes.append({"fraction": fraction, "keys": n,
                  "paper": common.best(part, temperatures=[1]),  # the paper's protocol: T = 1, λ tuned
                  "tuned": common.best(part)})                   # λ and T tuned
    print(sizes[-1])

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
keys = [s["keys"] for s in sizes]
for name, label in (("paper", "T = 1, λ tuned"), ("tuned", "λ and T tuned")):
    ax1.plot(keys, [s[name]["ppl"] for s in sizes], marker="o", label=f"kNN-LM, {label}")
    ax2.plot(keys, [s[name]["lambda"] for s in sizes], marker="o", label=label)
ax1.axhline(lm_ppl, color="gray", ls="--", label="LM alone")
ax1.set(xscale="log", xlabel="datastore size (keys, first part of the training split)",
        ylabel=f"{args.split} perplexity", title="perplexity")
ax2.set(xscale="log", xlabel="datastore size (keys)", ylabel="best λ", title="best λ")
ax2.set_ylim(bottom=0)
for ax in (ax1, ax2):
    ax.set_xticks(keys, [f"{n / 1000:.0f}k" for n in keys], minor=False)
    ax.set_xticks([], minor=True)
    ax.legend()
fig.suptitle(f"kNN-LM on {common.corpus_name(args)} {args.split} (k = {args.k}) as the datastore grows")
common.save(args, "datastore_size", {"split": args.split, "k": args.k, "lm_ppl": lm_ppl, "sizes": sizes}, fig)
