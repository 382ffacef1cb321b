"""
More data without training (the paper's Table 3 and Figure 2, section 4.2): the same model
trained on the first fifth of the training split only, with a datastore over the whole split,
against the model trained on all of it. The paper's LM trained on 100 M tokens with a
datastore of 3 B beats the same model trained on all 3 B (13.73 vs 15.17 test).

The smaller model is train.py with the main model's arguments (its checkpoint's), trained on
the first --fraction of the split (--train-tokens) for --fraction of the steps: the same number
of steps per training token (passes over its text), the same vocabulary (from the whole
split); --steps N gives it another budget (--steps 600, the main model's, is the same compute). Its
datastore covers the whole split (build_datastore.py), and its kNN-LM is scored as
that datastore grows: its first 1/5 (its own training text), 2/5, ..., all of it (Figure 2).
Both models are scored on the first --tokens tokens of the split, λ and T tuned there.

    python -m experiments.more_data --data ../shared/data/wikitext-103-small

-> experiments/results/more_data.{json,png} (more_data-steps-N with --steps N); the smaller model and
its datastore in --work
"""
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import knnlm  # noqa: E402
from experiments import common  # noqa: E402
from knnlm_tools import checkpoints, cli  # noqa: E402

p = common.parser(__doc__)
p.add_argument("--fraction", type=float, default=0.2,
               help="the smaller model's part of the training split, in (0, 1) (default: %(default)s)")
p.add_argument("--sizes", type=int, default=5,
               help="datastore sizes scored: 1/SIZES, 2/SIZES, ..., all of the split (default: %(default)s)")
p.add_argument("--steps", type=int, default=None,
               help="the smaller model's training steps (default: --fraction of the main model's, the same passes "
                    "over its text)")
p.add_argument("--tokens", type=int, default=50_000,
               help="score the first TOKENS tokens of --split (default: %(default)s)")
p.add_argument("--work", default="runs/more_data", help="where the smaller model and its datastore go (default: %(default)s)")
args = p.parse_args()
if not 0 < args.fraction < 1:
    p.error(f"--fraction must be in (0, 1), got {args.fraction}")
if args.sizes < 1 or args.tokens < 2 or (args.steps is not None and args.steps < 1):
    p.error(f"--sizes and --steps must be at least 1 and --tokens at least 2, got {args.sizes}, {args.steps} "
            f"and {args.tokens}")
if os.path.isdir(args.checkpoint) or not args.checkpoint.endswith(".pt"):
    p.error(f"--checkpoint {args.checkpoint}: this analysis retrains the model on less data, so it needs a "
            "checkpoint of train.py")
timings = {}

# the model of the whole split, its datastore, and what it was trained with
model, vocab, datastore, data_dir = common.load(args)
with cli.user_errors():
    trained_with = checkpoints.training_args(checkpoints.load_checkpoint(args.checkpoint)[2])
if trained_with is None:
    p.error(f"--checkpoint {args.checkpoint} does not say how it was trained: this analysis retrains the model on less data, "
            "so it needs a checkpoint of train.py")
split_tokens = len(vocab.encode_file(knnlm.split_path(data_dir, "train")))
part = round(args.fraction * split_tokens)
steps = args.steps or round(args.fraction * trained_with["max_iters"])
if part < model.cfg.block_size + 2 or steps < 1:
    p.error(f"--fraction {args.fraction} leaves {part:,} training tokens and {steps} steps: too few to train on")

# the same model trained on the first part of the split: by default for the same passes over its text
work = os.path.join(args.work, f"first-{part}-tokens-{steps}-steps")
small_checkpoint = os.path.join(work, "model.pt")
os.makedirs(work, exist_ok=True)
same = ("preset", "min_freq", "max_vocab", "dropout", "lr", "min_lr", "weight_decay", "grad_clip",
        "batch_size", "eval_tokens", "seed", "precision")
scale = steps / trained_with["max_iters"]  # warm-up and validations scaled with the steps
flags = {**{name: trained_with[name] for name in same if trained_with.get(name) is not None},
         "train_tokens": part, "max_iters": steps, "warmup_iters": round(scale * trained_with["warmup_iters"]),
         "eval_interval": max(1, round(scale * trained_with["eval_interval"]))}
with cli.user_errors():
    timings["train"] = common.train_model(args, small_checkpoint, **flags)
    start = time.time()
    common.build_datastore(args, args.data, os.path.join(work, "datastore"), checkpoint=small_checkpoint)
    timings["datastore"] = time.time() - start
small, small_vocab, small_datastore, _ = common.load(args, os.path.join(work, "datastore"), small_checkpoint)
if small_vocab.itos != vocab.itos:
    raise SystemExit(f"error: {small_checkpoint} has another vocabulary than {args.checkpoint}")

# both scored on the same tokens; the smaller model's kNN-LM as its datastore grows
start = time.time()
whole_cache = common.cached_pass(args, model, vocab, datastore, data_dir, tokens=args.tokens)
small_cache = common.cached_pass(args, small, small_vocab, small_datastore, data_dir, tokens=args.tokens)
whole = {"train_tokens": split_tokens, "steps": trained_with["max_iters"], "datastore": len(datastore),
         "passes": trained_with["max_iters"] * trained_with["batch_size"] * model.cfg.block_size / split_tokens,
         "lm_ppl": knnlm.perplexity(whole_cache["log_p_lm"]), "knnlm": common.best(whole_cache)}
sizes = []
for i in range(1, args.sizes + 1):
    n = round(i / args.sizes * len(small_datastore))
    if n < args.k:
        print(f"skipping a datastore of {n:,} keys < k = {args.k}")
        continue
    cache = common.first_rows(args, small_cache, small_datastore, n, f"{args.split}-first{args.tokens}-more-data")
    sizes.append({"keys": n, "paper": common.best(cache, temperatures=[1]), "tuned": common.best(cache)})
    print(sizes[-1])
timings["score"] = time.time() - start
small_numbers = {"train_tokens": part, "steps": steps, "passes": steps * flags["batch_size"] * model.cfg.block_size / part,
                 "lm_ppl": knnlm.perplexity(small_cache["log_p_lm"]),
                 "datastore_sizes": sizes}
numbers = {"split": args.split, "tokens": len(small_cache["targets"]), "k": args.k, "fraction": args.fraction,
           "whole": whole, "part": small_numbers,
           "protocol": "λ and T tuned on the tokens they are reported on; both models' checkpoints chosen by "
                       "train.py on the split's first --eval-tokens tokens",
           "seconds": {name: round(s, 1) for name, s in timings.items()}}  # this run's; 0: done by an earlier run

fig, ax = plt.subplots(figsize=(7, 4.4))
keys = [s["keys"] for s in sizes]
ax.plot(keys, [s["tuned"]["ppl"] for s in sizes], marker="o", color="C0",
        label=f"model of the first {args.fraction:.0%} ({steps} steps) + datastore (λ, T tuned)")
ax.plot(keys, [s["paper"]["ppl"] for s in sizes], marker="o", color="C0", ls=":", label="the same, T = 1")
ax.axhline(small_numbers["lm_ppl"], color="C0", ls="--", label=f"model of {args.fraction:.0%} alone")
ax.axhline(whole["lm_ppl"], color="C3", ls="--", label=f"model of all of it ({whole['steps']} steps) alone")
ax.axhline(whole["knnlm"]["ppl"], color="C3", ls="-", label="model of all of it + its datastore")
ax.set(xlabel="datastore size (keys: the first part of the training split)",
       ylabel=f"{args.split} perplexity (first {numbers['tokens']:,} tokens)",
       title=f"More data without training ({common.corpus_name(args)})")
ax.set_xticks(keys, [f"{n / 1000:.0f}k" for n in keys])
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
common.save(args, "more_data" + (f"-steps-{args.steps}" if args.steps else ""), numbers, fig)
