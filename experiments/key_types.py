"""
Key type (the paper's Table 5): which hidden state of the final Transformer block makes
the best kNN key. One datastore per key type (built with build_datastore.py --key-type
when missing, in <datastore>-<key type>), each searched exactly for every validation
token; λ (and T) tuned on the same split, as in the paper's table of validation results.

    python -m experiments.key_types --data ../shared/data/wikitext-103-small

-> experiments/results/key_types.{json,png}
"""
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import knnlm  # noqa: E402
from knnlm_tools import cli  # noqa: E402
from experiments import common  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--key-types", nargs="+", default=["ffn_in_ln", "ffn_in", "block_out", "attn_out", "block_in"],
               choices=knnlm.KEY_TYPES, help="the keys to compare (default: %(default)s)")
args = p.parse_args()

rows = []
for key_type in args.key_types:
    path = args.datastore if key_type == "ffn_in_ln" else f"{args.datastore}-{key_type}"
    with cli.user_errors():
        common.build_datastore(args, args.data, path, key_type)
    model, vocab, datastore, data_dir = common.load(args, path)
    if datastore.meta.key_type != key_type:
        sys.exit(f"error: {path} holds {datastore.meta.key_type} keys, not {key_type}")
    cache = common.cached_pass(args, model, vocab, datastore, data_dir)
    rows.append({"key_type": key_type, "description": knnlm.KEY_TYPES[key_type], "datastore": path,
                 "lm_ppl": knnlm.perplexity(cache["log_p_lm"]),
                 "paper": common.best(cache, temperatures=[1]),  # T = 1, λ tuned
                 "tuned": common.best(cache)})                   # λ and T tuned
    print(rows[-1])
    del cache

fig, ax = plt.subplots(figsize=(9, 4.2))
x = range(len(rows))
ax.bar([i - 0.2 for i in x], [r["paper"]["ppl"] for r in rows], width=0.4, label="T = 1, λ tuned")
ax.bar([i + 0.2 for i in x], [r["tuned"]["ppl"] for r in rows], width=0.4, label="λ and T tuned")
ax.axhline(rows[0]["lm_ppl"], color="gray", ls="--", label="LM alone")
for i, r in enumerate(rows):
    for dx, name in ((-0.2, "paper"), (0.2, "tuned")):
        ax.text(i + dx, r[name]["ppl"], f"{r[name]['ppl']:.1f}", ha="center", va="bottom", fontsize=8)
ax.set_xticks(list(x), [r["key_type"] for r in rows])
ax.set(ylabel=f"{args.split} perplexity", ylim=(min(r["tuned"]["ppl"] for r in rows) * 0.9, rows[0]["lm_ppl"] * 1.03),
       title=f"kNN-LM on {common.corpus_name(args)} {args.split} by key type (k = {args.k})")
ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
common.save(args, "key_types", {"split": args.split, "k": args.k, "key_types": rows}, fig)
