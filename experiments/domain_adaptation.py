"""
Domain adaptation (the paper's section 4.3): the model trained on WikiText, with no
retraining, gets a datastore built from another domain's training split; λ is tuned
on that domain's validation split and perplexity reported on its test split, next to
the LM alone and to kNN-LM with the model's own (WikiText) datastore.

The other domain, by default, is the fortune cookies of Debian's `fortunes` package
(quotations, jokes, definitions: ~0.5 M words of short modern English), fetched with
`apt-get download` and turned into the WikiText format by experiments/to_wikitext.py.
Any raw text (--raw, --separator) or any directory already in the WikiText format
(--target-data) works too. Words outside the model's vocabulary become <unk>.

    python -m experiments.domain_adaptation --data ../shared/data/wikitext-103-small

-> experiments/results/domain_adaptation.{json,png}
"""
import filecmp
import glob
import os
import subprocess
import tempfile

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import knnlm  # noqa: E402
from knnlm_tools import corpora, cli  # noqa: E402
from experiments import common, to_wikitext  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--target-data", default="data/fortunes",
               help="the other domain in the WikiText format; made from --raw when missing, and checked against it when "
                    "there (default: %(default)s)")
p.add_argument("--raw", nargs="+", default=None,
               help="raw text files or directories to convert (default: the `fortunes` Debian package)")
p.add_argument("--separator", default="%", help="line separating documents in the raw files (default: %(default)s)")
p.add_argument("--target-datastore", default="runs/datastore-fortunes",
               help="the datastore of the other domain's train split (default: %(default)s)")
args = p.parse_args()


def fetch_fortunes(dest):
    """Debian's `fortunes` package, unpacked (no root needed): -> the directory of fortune files."""
    files = os.path.join(dest, "usr", "share", "games", "fortunes")
    if not os.path.isdir(files):
        os.makedirs(dest, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run(["apt-get", "download", "fortunes"], cwd=tmp, capture_output=True, text=True)
            debs = glob.glob(os.path.join(tmp, "fortunes_*.deb"))
            if got.returncode != 0 or not debs:
                raise knnlm.KnnlmError("could not fetch Debian's fortunes package (`apt-get download fortunes`: "
                                       f"{got.stderr.strip() or 'no .deb'}); run `apt-get update` first, or pass "
                                       "--raw with text files of your own")
            subprocess.run(["dpkg-deb", "-x", debs[0], dest], check=True)
    return files


def check_made_from(raw, target, separator):
    """Refuse a corpus in target other than the one the raw texts make: it would be used in their place."""
    with tempfile.TemporaryDirectory() as made:
        to_wikitext.convert(raw, made, separator)
        if not all(filecmp.cmp(knnlm.split_path(made, s), knnlm.split_path(target, s), shallow=False) for s in knnlm.SPLITS):
            raise knnlm.KnnlmError(f"{target} holds another corpus than {' '.join(raw)} makes (with --separator "
                                   f"{separator!r}): pass another --target-data, or remove it")


with cli.user_errors():
    if not all(os.path.isfile(knnlm.split_path(args.target_data, s)) for s in knnlm.SPLITS):
        raw = args.raw or [fetch_fortunes("runs/raw/fortunes")]
        counts = to_wikitext.convert(raw, args.target_data, args.separator)
        print(f"wrote {args.target_data} from {' '.join(raw)}: {counts}")
    elif args.raw:
        check_made_from(args.raw, args.target_data, args.separator)
    common.build_datastore(args, args.target_data, args.target_datastore)

target_name = os.path.basename(os.path.normpath(args.target_data))
numbers = {"target_data": args.target_data, "k": args.k, "datastores": {}}
curves = {}  # label -> (valid cache, its best at T = 1, its best (λ, T))


def tuned_curves(label, valid):
    curves[label] = (valid, common.best(valid, temperatures=[1]), common.best(valid))
    return curves[label]


for name, path in {"WikiText train": args.datastore, f"{target_name} train": args.target_datastore}.items():
    model, vocab, datastore, _ = common.load(args, path)
    target = corpora.resolve_corpus(args.target_data)
    valid = common.cached_pass(args, model, vocab, datastore, target, "valid")
    test = common.cached_pass(args, model, vocab, datastore, target, "test")
    _, tuned, tuned_T = tuned_curves(f"{target_name} valid, {name} datastore", valid)
    numbers["datastores"][name] = {
        "datastore": path, "keys": len(datastore),
        "best_on_valid": tuned,  # the paper's protocol: λ tuned on valid, T = 1
        "tuned_T": tuned_T,      # λ and T tuned on valid
        "test_knnlm_ppl": knnlm.perplexity(knnlm.knnlm_log_probs(test, tuned["lambda"])),
        "test_knnlm_ppl_tuned_T": knnlm.perplexity(knnlm.knnlm_log_probs(test, tuned_T["lambda"],
                                                                         tuned_T["temperature"])),
        "test_lm_ppl": knnlm.perplexity(test["log_p_lm"]), "valid_lm_ppl": knnlm.perplexity(valid["log_p_lm"]),
        "unk_rate_test": (test["targets"] == vocab.unk).float().mean().item()}
    print(name, numbers["datastores"][name])

# in domain, for comparison: WikiText valid with the WikiText datastore (the sweeps' cached pass)
model, vocab, datastore, data_dir = common.load(args)
wiki = common.cached_pass(args, model, vocab, datastore, data_dir, "valid")
_, tuned, tuned_T = tuned_curves(f"{common.corpus_name(args)} valid, WikiText train datastore (in domain)", wiki)
numbers["in_domain_valid"] = {"best_on_valid": tuned, "tuned_T": tuned_T}

# λ curves relative to the LM alone, at T = 1 (the paper's) and at each one's tuned T
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True, layout="constrained")
numbers["lambda_curves"] = {}
for label, (valid, tuned, tuned_T) in curves.items():
    lm = knnlm.perplexity(valid["log_p_lm"])
    for ax, best_at in zip(axes, (tuned, tuned_T)):
        curve = common.lambda_curve(valid, best_at["temperature"])
        numbers["lambda_curves"][f"{label}, T={best_at['temperature']}"] = curve
        ax.plot(list(curve), [ppl / lm if ppl else None for ppl in curve.values()], marker=".",
                ls=":" if "in domain" in label else "-",
                label=f"{label}: best λ = {best_at['lambda']}" + ("" if ax is axes[0] else f" (T = {best_at['temperature']})"))
for ax, title in zip(axes, ("T = 1 (the paper's)", "T tuned on valid")):
    ax.axhline(1, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="λ (weight of p_kNN)", title=title, ylim=(0.5, 1.5))
    ax.legend(fontsize=8, loc="upper left")
axes[0].set_ylabel("valid perplexity / the LM's")
fig.suptitle(f"Domain adaptation: the WikiText model, no retraining, on {target_name}")
common.save(args, "domain_adaptation", numbers, fig)
