"""
Memorizing is not enough (the paper's section 6, Figure 8): the same Transformer trained
without dropout until its training loss is near zero, i.e. it has memorized its training
text, then interpolated with the regular LM,
    p = w p_memorizer + (1 - w) p_LM,   w tuned on the split,
against kNN-LM whose datastore holds the same text. If kNN-LM's gain came from a model
that remembers its training data, the memorizer would give it too. (The paper: the memorizer
reaches a training loss near 0 but a worse validation perplexity, 28.59 vs 17.96, and
interpolating it gains 0.1 where kNN-LM gains 1.9.)

Two CPU cores cannot memorize the whole split in minutes, so both models here learn its first
--train-tokens tokens, for --max-iters steps of --batch-size windows at a constant learning
rate (the main model's peak, after its warm-up), with the main model's other arguments (its
checkpoint's): one with its dropout (the regular curve), one with none (the memorizer).
Memorizing is limited by the optimizer's steps more than by the tokens seen, so small batches
memorize sooner. The LM they are mixed with is the main model (all of the split); kNN-LM's
datastore is the main datastore's first --train-tokens rows, the same text. Scored on the
first --tokens tokens of the split, weights tuned there.

    python -m experiments.memorize --data ../shared/data/wikitext-103-small

-> experiments/results/memorize.{json,png}; the two models in --work
"""
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import knnlm  # noqa: E402
from experiments import common  # noqa: E402
from knnlm_tools import checkpoints, cli  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--train-tokens", type=int, default=10_000,
               help="the first TRAIN_TOKENS tokens of the training split are memorized (default: %(default)s)")
p.add_argument("--max-iters", type=int, default=1400, help="training steps of both models (default: %(default)s)")
p.add_argument("--batch-size", type=int, default=2, help="windows a step, both models (default: %(default)s)")
p.add_argument("--tokens", type=int, default=50_000,
               help="score the first TOKENS tokens of --split (default: %(default)s)")
p.add_argument("--work", default="runs/memorize", help="where the two models go (default: %(default)s)")
args = p.parse_args()
if args.max_iters < 1 or args.batch_size < 1 or args.tokens < 2:
    p.error(f"--max-iters and --batch-size must be at least 1 and --tokens at least 2, got {args.max_iters}, "
            f"{args.batch_size} and {args.tokens}")
if os.path.isdir(args.checkpoint) or not args.checkpoint.endswith(".pt"):
    p.error(f"--checkpoint {args.checkpoint}: this analysis trains the model again, so it needs a checkpoint of train.py")

model, vocab, datastore, data_dir = common.load(args)
with cli.user_errors():
    trained_with = checkpoints.training_args(checkpoints.load_checkpoint(args.checkpoint)[2])
if trained_with is None:
    p.error(f"--checkpoint {args.checkpoint} does not say how it was trained: this analysis trains the model again, "
            "so it needs a checkpoint of train.py")
if not model.cfg.block_size + 2 <= args.train_tokens <= len(datastore):
    p.error(f"--train-tokens must be in [{model.cfg.block_size + 2}, {len(datastore):,}] (the context + 2, the "
            f"datastore's rows), got {args.train_tokens}")
if args.train_tokens < args.k:
    p.error(f"--train-tokens {args.train_tokens} is fewer than k = {args.k} neighbours")

# the regular model and the memorizer, on the same text for the same steps; only dropout differs
same = ("preset", "min_freq", "max_vocab", "lr", "weight_decay", "grad_clip", "seed", "precision")
flags = {**{name: trained_with[name] for name in same if trained_with.get(name) is not None},
         "min_lr": trained_with["lr"], "batch_size": args.batch_size, "train_tokens": args.train_tokens,
         "max_iters": args.max_iters, "warmup_iters": min(trained_with["warmup_iters"], args.max_iters // 10),
         "eval_interval": max(1, args.max_iters // 14), "eval_tokens": min(args.tokens, 10_000)}  # the curves only
os.makedirs(args.work, exist_ok=True)
runs, seconds = {}, {}
for name, dropout in (("regular", trained_with["dropout"]), ("memorizer", 0.0)):
    path = os.path.join(args.work, f"{name}.pt")
    with cli.user_errors():
        seconds[f"train {name}"] = common.train_model(args, path, **flags, dropout=dropout)
        runs[name] = checkpoints.load_checkpoint(os.path.splitext(path)[0] + ".last.pt")  # its last state
    if runs[name][1].itos != vocab.itos:
        raise SystemExit(f"error: {path} has another vocabulary than {args.checkpoint}")

# each mixed with the main LM, against kNN-LM over a datastore of the same text
cache = common.cached_pass(args, model, vocab, datastore, data_dir, tokens=args.tokens)
text = vocab.encode_file(knnlm.split_path(data_dir, args.split))[:args.tokens]
assert text[1:].equal(cache["targets"])
lm_ppl = knnlm.perplexity(cache["log_p_lm"])


def mixed(log_p):
    curve = {w: knnlm.perplexity(knnlm.interpolate(cache["log_p_lm"], log_p, w)) for w in knnlm.LAMBDAS[:-1]}
    w = min(curve, key=curve.get)
    return {"ppl": knnlm.perplexity(log_p), "weight": w, "mixed_ppl": curve[w], "gain": lm_ppl - curve[w]}


models = {}
for name, (m, _, state) in runs.items():
    with torch.no_grad():
        log_p = knnlm.score_split(m, text, progress=False)["log_p_lm"]
    models[name] = {"dropout": state["config"]["dropout"], "history": state["history"], "seconds": seconds[f"train {name}"],
                    **mixed(log_p)}
    print(name, {k: v for k, v in models[name].items() if k != "history"})


part = common.first_rows(args, cache, datastore, args.train_tokens, f"{args.split}-first{args.tokens}-memorize")
knn = {"same_text": {**common.best(part), "keys": args.train_tokens},
       "whole_split": {**common.best(cache), "keys": len(datastore)}}
for row in knn.values():
    row["gain"] = lm_ppl - row["ppl"]
numbers = {"split": args.split, "tokens": len(cache["targets"]), "k": args.k, "train_tokens": args.train_tokens,
           "max_iters": args.max_iters, "passes": args.max_iters * flags["batch_size"] * model.cfg.block_size / args.train_tokens,
           "lm_ppl": lm_ppl, "models": models, "knnlm": knn,
           "protocol": "weights (w; λ and T) tuned on the tokens they are reported on"}

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
for i, (name, row) in enumerate(models.items()):
    steps = [h["step"] for h in row["history"]]
    label = f"{name} (dropout {row['dropout']:g})"
    ax1.plot(steps, [h["train_loss"] for h in row["history"]], marker="o", color=f"C{i}", label=label)
    ax2.plot(steps, [h["valid_ppl"] for h in row["history"]], marker="o", color=f"C{i}", label=label)
ax1.set(xlabel="step", ylabel="training loss (nats, mean since the last point)", ylim=(0, None),
        title=f"training, first {args.train_tokens:,} tokens")
ax2.set(xlabel="step", ylabel=f"valid perplexity (first {flags['eval_tokens']:,} tokens)", yscale="log",
        title="validation")
for ax in (ax1, ax2):
    ax.legend()
fig.suptitle(f"Memorizing is not enough ({common.corpus_name(args)}): LM + memorizer {models['memorizer']['mixed_ppl']:.1f}, "
             f"kNN-LM over the same text {knn['same_text']['ppl']:.1f}, LM {lm_ppl:.1f}")
common.save(args, "memorize", numbers, fig)
