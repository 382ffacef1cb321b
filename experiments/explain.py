"""
Explanations (the paper's Table 6 and Appendix A): where, and why, the nearest neighbours
help. Lists the tokens of a split where p_kNN most exceeds p_LM, and for a position
(--position; default: the top ones) prints the context, the target, p_LM and p_kNN, and
the nearest neighbours with their own left contexts, read back from the text the
datastore was built from (row r: key f(train[:r + 1]), value train[r + 1]), their
targets and their weights in p_kNN. The plot shows the two probabilities for every
token, and the gain of kNN-LM over the LM by how often the target occurs in the datastore.

    python -m experiments.explain --data ../shared/data/wikitext-103-small
    python -m experiments.explain --data ../shared/data/wikitext-103-small --position 1234

-> experiments/results/explain.{md,json,png}
"""
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import knnlm  # noqa: E402
from knnlm_tools import corpora, cli, files  # noqa: E402
from experiments import common  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--lambda", dest="lmbda", type=float, default=None, help="λ of the mix (default: tuned on valid)")
p.add_argument("--temperature", type=float, default=None, help="T of p_kNN (default: tuned on valid)")
p.add_argument("--position", type=int, nargs="*", default=None,
               help="token positions of the split to explain (default: the --top ones where p_kNN most exceeds p_LM)")
p.add_argument("--top", type=int, default=5, help="tokens listed and explained (default: %(default)s)")
p.add_argument("--neighbours", type=int, default=8, help="neighbours shown per token (default: %(default)s)")
p.add_argument("--context", type=int, default=20, help="words of context shown (default: %(default)s)")
args = p.parse_args()
if args.lmbda is not None and not 0 <= args.lmbda <= 1:
    p.error(f"--lambda must be in [0, 1], got {args.lmbda}")
if args.temperature is not None and not args.temperature > 0:
    p.error(f"--temperature must be > 0, got {args.temperature}")

model, vocab, datastore, data_dir = common.load(args)
cache = common.cached_pass(args, model, vocab, datastore, data_dir)
if args.lmbda is None or args.temperature is None:  # the setting tuned on valid (the sweeps' pass)
    tuned = common.best(cache if args.split == "valid" else common.cached_pass(args, model, vocab, datastore,
                                                                               data_dir, "valid"))
    args.lmbda = tuned["lambda"] if args.lmbda is None else args.lmbda
    args.temperature = tuned["temperature"] if args.temperature is None else args.temperature
tokens = vocab.encode_file(knnlm.split_path(data_dir, args.split))  # cache row j is the target tokens[j + 1]
source = datastore.meta.source
with cli.user_errors():
    if corpora.file_fingerprint(source["file"]) != source["sha256"]:
        raise knnlm.KnnlmError(f"{source['file']} changed since the datastore was built from it")
    if args.position and not all(0 <= i < len(cache["targets"]) for i in args.position):
        raise knnlm.KnnlmError(f"--position must be in [0, {len(cache['targets'])}) for {args.split}")
train = vocab.encode_file(source["file"])  # datastore row r is the target train[r + 1]

log_p_lm = cache["log_p_lm"]
log_p_knn = knnlm.knn_log_prob(cache["dists"], cache["neighbour_vals"], cache["targets"], args.temperature)
log_p = knnlm.interpolate(log_p_lm, log_p_knn, args.lmbda)
gain = log_p_knn - log_p_lm
top = gain.topk(args.top).indices.tolist()


def text(ids):
    return knnlm.Vocab.decode(vocab, ids.tolist()).replace("<eos>", "¶")


def explain(j):
    """The record of split position j: its context and probabilities, and its nearest neighbours."""
    target = cache["targets"][j].item()
    dists, ids = datastore.search(cache["queries"][j:j + 1].float(), args.k)  # exact, as common.load set it
    weights = torch.softmax(-dists[0] / args.temperature, dim=0)
    shown = []
    for d, row, w in zip(dists[0].tolist(), ids[0].tolist(), weights.tolist()):
        if len(shown) == args.neighbours:
            break
        context, value = knnlm.row_context(train, row, args.context)
        value = int(value)
        shown.append({"row": row, "distance": d, "weight": w, "context": text(context), "value": vocab.itos[value],
                      "value_is_target": value == target})
    return {"position": j, "context": text(tokens[max(0, j + 1 - args.context):j + 1]), "target": vocab.itos[target],
            "p_lm": log_p_lm[j].exp().item(), "p_knn": log_p_knn[j].exp().item(), "p": log_p[j].exp().item(),
            "neighbours": shown}


records = [explain(j) for j in (args.position or top)]
lines = [f"# Explanations: {common.corpus_name(args)} {args.split}, {len(datastore):,}-key datastore, "
         f"k = {args.k}, λ = {args.lmbda}, T = {args.temperature}", "",
         f"`{common.command()}`", ""]
for r in records:
    lines += [f"## position {r['position']}: target **{r['target']}**", "",
              f"context: … {r['context']} → **{r['target']}**", "",
              f"p_LM = {r['p_lm']:.3g}, p_kNN = {r['p_knn']:.3g}, kNN-LM p = {r['p']:.3g}", "",
              "| weight | distance | training context (datastore row) | value |", "|---:|---:|---|---|"]
    lines += [f"| {n['weight']:.3f} | {n['distance']:.1f} | … {n['context']} (row {n['row']:,}) | "
              f"{'**' + n['value'] + '**' if n['value_is_target'] else n['value']} |" for n in r["neighbours"]]
    lines.append("")
report = "\n".join(lines)
print(report)
os.makedirs(args.out, exist_ok=True)
with files.atomic_write(os.path.join(args.out, "explain.md")) as tmp, open(tmp, "w") as f:
    f.write(report)

# the plot: p_kNN against p_LM for every token, and the gain by how often the target is a datastore value
counts = torch.bincount(datastore.vals, minlength=len(vocab))[cache["targets"]]
edges = [0, 1, 10, 100, 1_000, 10_000, float("inf")]
buckets = []
for lo, hi in zip(edges, edges[1:]):
    mask = (counts >= lo) & (counts < hi)
    if mask.any():
        buckets.append({"count": f"{lo:,}" if lo == 0 else f"{lo:,}–{hi - 1:,}" if hi < float("inf") else f"≥{lo:,}",
                        "tokens": int(mask.sum()),
                        "lm_ppl": knnlm.perplexity(log_p_lm[mask]), "knnlm_ppl": knnlm.perplexity(log_p[mask])})
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
h = ax1.hexbin(log_p_lm.exp().numpy(), log_p_knn.exp().numpy(), gridsize=40, bins="log", cmap="viridis",
               extent=(0, 1, 0, 1))
ax1.plot([0, 1], [0, 1], color="white", lw=0.8)
ax1.set(xlabel="p_LM(target)", ylabel="p_kNN(target)", title=f"every {args.split} token (above the line: kNN is surer)")
fig.colorbar(h, ax=ax1, label="tokens")
x = range(len(buckets))
ax2.bar([i - 0.2 for i in x], [b["lm_ppl"] for b in buckets], width=0.4, label="LM")
ax2.bar([i + 0.2 for i in x], [b["knnlm_ppl"] for b in buckets], width=0.4, label=f"kNN-LM (λ = {args.lmbda})")
ax2.set_xticks(list(x), [f"{b['count']}\n({b['tokens']:,} tok)" for b in buckets], fontsize=8)
ax2.set(yscale="log", xlabel="times the target word is a datastore value", ylabel="perplexity of those tokens",
        title="by the target's count in the datastore")
ax2.legend()
common.save(args, "explain", {"split": args.split, "k": args.k, "lambda": args.lmbda, "temperature": args.temperature,
                              "top_gain_positions": top, "records": records, "by_count": buckets}, fig)
