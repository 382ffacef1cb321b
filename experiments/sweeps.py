"""
λ, k and temperature sweeps (the paper's Figures 5 and 4, and the temperature later
work found matters), all from one cached pass over the validation split: p_LM and the
1024 nearest neighbours of every token are computed once, then re-mixed per setting.

    python -m experiments.sweeps --data ../shared/data/wikitext-103-small

-> experiments/results/sweeps.{json,png}
"""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import knnlm  # noqa: E402
from experiments import common  # noqa: E402
from experiments.common import KS  # noqa: E402

args = common.parser(__doc__).parse_args()
model, vocab, datastore, data_dir = common.load(args)
cache = common.cached_pass(args, model, vocab, datastore, data_dir)
lm_ppl = knnlm.perplexity(cache["log_p_lm"])
tuned = common.best(cache)
T_best = tuned["temperature"]
ks = [k for k in KS if k <= args.k]


print(f"LM ppl {lm_ppl:.2f}; best {tuned}")
numbers = {
    "split": args.split, "tokens": len(cache["targets"]), "datastore_size": len(datastore), "lm_ppl": lm_ppl,
    "best": tuned,
    # Fig. 5: λ from 0 (the LM alone) to 1 (kNN alone), at k = 1024
    "lambda": {f"T={T}": common.lambda_curve(cache, T) for T in (1, T_best)},
    # Fig. 4: k from 1 to 1024, λ tuned for each k
    "k": {f"T={T}": {k: common.best(cache, temperatures=[T], k=k) for k in ks} for T in (1, T_best)},
    # temperature, λ tuned for each T, at k = 1024
    "temperature": {T: common.best(cache, temperatures=[T]) for T in knnlm.TEMPERATURES},
    # why T matters: how far the neighbours are, and how much of p_kNN the nearest few carry
    "median_distance": {rank: cache["dists"][:, rank - 1].median().item() for rank in ks},
    "mass_of_nearest": {f"T={T}": {n: torch.softmax(-cache["dists"] / T, 1)[:, :n].sum(1).mean().item()
                                   for n in (1, 8, 128)} for T in (1, T_best)},
}

fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
ax = axes[0]
for name, curve in numbers["lambda"].items():
    ax.plot(list(curve), list(curve.values()), marker=".", label=f"kNN-LM, {name}")
ax.axhline(lm_ppl, color="gray", ls="--", label="LM alone")
ax.set(xlabel="λ (weight of p_kNN)", ylabel=f"{args.split} perplexity", title=f"λ (k = {args.k})",
       ylim=(min(lm_ppl, tuned["ppl"]) * 0.95, lm_ppl * 1.6))
ax.legend()
ax = axes[1]
for name, curve in numbers["k"].items():
    ax.plot(list(curve), [r["ppl"] for r in curve.values()], marker=".", label=f"kNN-LM, {name}, λ tuned per k")
ax.axhline(lm_ppl, color="gray", ls="--", label="LM alone")
ax.set(xscale="log", xlabel="k (neighbours)", ylabel=f"{args.split} perplexity", title="k")
ax.set_xticks(ks[::2], [str(k) for k in ks[::2]])
ax.legend()
ax = axes[2]
curve = numbers["temperature"]
ax.plot(list(curve), [r["ppl"] for r in curve.values()], marker=".", label=f"kNN-LM, λ tuned per T (k = {args.k})")
ax.axhline(lm_ppl, color="gray", ls="--", label="LM alone")
ax.set(xscale="log", xlabel="temperature T in exp(-d / T)", ylabel=f"{args.split} perplexity", title="temperature")
ax.legend()
fig.suptitle(f"kNN-LM on {common.corpus_name(args)} {args.split}: {len(datastore):,}-key datastore, one cached pass")
common.save(args, "sweeps", numbers, fig)
