"""
n-grams are not enough (the paper's section 6, Figure 7): interpolated Kneser-Ney n-gram LMs
(experiments/kneser_ney.py) of order 1 to 5, trained on the training split (the datastore's
text, through the model's vocabulary), each interpolated with the Transformer LM,
    p = w p_ngram + (1 - w) p_LM,   w tuned on the split,
against kNN-LM over the same training text (λ and T tuned the same way). If kNN-LM only
remembered which words follow which, an n-gram LM of that text would give the same gain, and
kNN-LM mixed on top of LM + n-gram LM (λ and T tuned again) would add little.

p_LM and the neighbours come from the cached pass of experiments/sweeps.py (computed here if
missing).

    python -m experiments.ngrams --data ../shared/data/wikitext-103-small

-> experiments/results/ngrams.{json,png}
"""
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import knnlm  # noqa: E402
from experiments import common  # noqa: E402
from experiments.kneser_ney import KneserNey  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="n-gram orders (default: 1 to 5)")
args = p.parse_args()
if not all(1 <= n <= 10 for n in args.orders):
    p.error(f"--orders must be in [1, 10] (a 10-gram of WikiText-103-small is seen once), got {args.orders}")
model, vocab, datastore, data_dir = common.load(args)
cache = common.cached_pass(args, model, vocab, datastore, data_dir)
train = vocab.encode_file(knnlm.split_path(data_dir, datastore.meta.source["split"] if datastore.meta.source
                                           else "train")).tolist()
text = vocab.encode_file(knnlm.split_path(data_dir, args.split)).tolist()
assert text[1:] == cache["targets"].tolist()  # the cached pass scored this text
lm_ppl = knnlm.perplexity(cache["log_p_lm"])

rows = []
for n in sorted(set(args.orders)):
    start = time.time()
    ngram = KneserNey(train, n, len(vocab))
    log_p = torch.tensor(ngram.log_probs(text))
    curve = {w: knnlm.perplexity(knnlm.interpolate(cache["log_p_lm"], log_p, w)) for w in knnlm.LAMBDAS[:-1]}
    w = min(curve, key=curve.get)
    on_top = common.best({**cache, "log_p_lm": knnlm.interpolate(cache["log_p_lm"], log_p, w)})
    rows.append({"order": n, "ngram_ppl": knnlm.perplexity(log_p), "weight": w, "lm_plus_ngram_ppl": curve[w],
                 "gain": lm_ppl - curve[w], "discounts": list(ngram.discounts.values()),
                 "plus_knnlm": {**on_top, "gain": curve[w] - on_top["ppl"]},
                 "seconds": round(time.time() - start, 1)})
    print(rows[-1])
knn = common.best(cache)
numbers = {"split": args.split, "lm_ppl": lm_ppl, "knnlm": {**knn, "gain": lm_ppl - knn["ppl"], "k": args.k},
           "ngrams": rows, "train_tokens": len(train), "datastore_size": len(datastore),
           "protocol": "weights tuned on the split they are reported on, for the n-grams and kNN-LM alike"}

fig, ax = plt.subplots(figsize=(6.5, 4.2))
orders = [r["order"] for r in rows]
ax.plot(orders, [r["lm_plus_ngram_ppl"] for r in rows], marker="o", label="LM + n-gram LM (weight tuned)")
ax.plot(orders, [r["plus_knnlm"]["ppl"] for r in rows], marker="o", color="C3", ls=":",
        label="LM + n-gram LM, then kNN-LM on top")
ax.axhline(lm_ppl, color="gray", ls="--", label=f"LM alone ({lm_ppl:.1f})")
ax.axhline(knn["ppl"], color="C3", ls="-", label=f"kNN-LM ({knn['ppl']:.1f})")
ax.set(xlabel="n-gram order n", ylabel=f"{args.split} perplexity", xticks=orders,
       title=f"n-grams of the training text vs kNN-LM over it ({common.corpus_name(args)} {args.split})")
ax.legend()
common.save(args, "ngrams", numbers, fig)
